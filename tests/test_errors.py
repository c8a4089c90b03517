"""Every expected failure of the library is a UserError, so the CLI prints it as one line (exit 2)."""

import importlib
import inspect
import pkgutil

import sdsclip
from sdsclip.errors import UserError

# Raised and reported by their own CLI commands (kubeflow submit, PyTorchJob render/wait), not by `_stage`.
OWN_HANDLING = {"SubmitError", "PyTorchJobError", "PyTorchJobFailed", "PyTorchJobTimeout"}


def test_every_error_class_of_the_library_is_a_user_error():
    found, wrong = [], []
    for info in pkgutil.walk_packages(sdsclip.__path__, "sdsclip."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, Exception):
                continue
            found.append(name)
            if name not in OWN_HANDLING and not issubclass(cls, UserError):
                wrong.append(f"{module.__name__}.{name}")
    assert {"StudentLoadError", "TeacherLoadError", "DataError", "WeightFileError", "TrainError"} <= set(found)
    assert not wrong, f"derive these from sdsclip.errors.UserError: {', '.join(wrong)}"
