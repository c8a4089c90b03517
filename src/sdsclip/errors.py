"""The base of every expected failure: bad params, bad data, missing or broken model files.

Each module defines its own error class on top of ``UserError`` (``StudentLoadError``, ``DataError``, ...), whose
message is one line naming the file or key and the fix. The CLI turns any ``UserError`` into that line and exit
code 2 instead of a traceback; catching the base here means the CLI need not import every module for its error
class (so each DVC stage imports, and depends on, only the code it runs).
"""


class UserError(Exception):
    """An expected failure the user can fix; ``str(err)`` is one line."""
