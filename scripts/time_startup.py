"""Time the README's first command from a cold process: wall clock, CPU time and peak RSS, median of N runs.

    PYTHONPATH=src python scripts/time_startup.py [--runs 5] [-- extra generate options]

Each run is a fresh `python -m sdlab generate "a large red circle on the left" -o OUT` (the bundled model).
CPU time (user + system) is printed beside the wall clock because on a shared machine the wall clock
mostly measures the other processes; the machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a large red circle on the left"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def one_run(extra: list[str], output: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS in KiB) of one cold `sdlab generate`."""
    command = [sys.executable, "-m", "sdlab", "generate", PROMPT, "-o", output, *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("extra", nargs="*", help="options passed on to sdlab generate (after --)")
    args = parser.parse_args()
    print(f"load average before: {load_average()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory() as folder:
        runs = [one_run(args.extra, os.path.join(folder, "out.png")) for _ in range(args.runs)]
    walls, cpus, rss = zip(*runs)
    print("wall s: " + " ".join(f"{w:.2f}" for w in walls) + f"  median {statistics.median(walls):.2f}")
    print("CPU s:  " + " ".join(f"{c:.2f}" for c in cpus) + f"  median {statistics.median(cpus):.2f}")
    print(f"peak RSS: median {statistics.median(rss) / 1024:.0f} MiB")
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
