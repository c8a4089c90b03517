"""Start-up cost of a component in the CPU image against the same command in this machine's venv.

Times, side by side in one run, from the launch of the command to the first line it prints:
  - the interpreter alone (`python3 -c print`): what docker run itself adds;
  - a component's imports (`import sdsclip.stages, kfp` then print): what every pipeline task pays before
    its first log line;
  - `sdsclip --help` (the CLI's imports and typer).
Each as `docker run --rm --network none IMAGE ...` and as a plain subprocess of .venv/bin/python; median of
--repeats runs after one warm-up each. Needs a docker engine and `make images`.

    python benchmarks/container_start.py [--image ghcr.io/sdsclip/sdsclip:0.1.0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBES = {
    "interpreter": ["python3", "-c", "print('first line')"],
    "component imports": ["python3", "-c", "import sdsclip.stages, kfp; print('first line')"],
    "sdsclip --help": ["sdsclip", "--help"],
}


def first_line_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.stdout.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}")
    return elapsed


def median_seconds(command: list[str], repeats: int) -> float:
    first_line_seconds(command)  # warm-up: page cache, docker's image metadata
    return statistics.median(first_line_seconds(command) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="ghcr.io/sdsclip/sdsclip:0.1.0")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    venv_bin = Path(sys.executable).parent
    print(f"{'to the first line':<20} {'container s':>12} {'venv s':>8} {'ratio':>6}")
    for name, command in PROBES.items():
        here = [str(venv_bin / command[0]) if command[0] == "sdsclip" else sys.executable, *command[1:]]
        container = ["docker", "run", "--rm", "--network", "none", args.image, *command]
        c, h = median_seconds(container, args.repeats), median_seconds(here, args.repeats)
        print(f"{name:<20} {c:>12.2f} {h:>8.2f} {c / h:>6.2f}")


if __name__ == "__main__":
    main()
