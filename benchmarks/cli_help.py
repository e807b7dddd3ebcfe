"""Start-up time of ``guidekit --help``: this tree against another commit's, in fresh processes, interleaved.

    python benchmarks/cli_help.py                  # this tree against 777e092 (the CLI that imported everything)
    python benchmarks/cli_help.py --against HEAD~3 --rounds 11

Each round runs ``python -m guidekit --help`` once per tree, in a new process with that tree first on
``PYTHONPATH`` (the other commit is checked out into a temporary git worktree), rotating the order every round.
Prints the median and minimum wall time of each tree and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time_help(tree: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "guidekit", "--help"], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--against", default="777e092", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"machine: {datetime.date.today().isoformat()}, CPU, {os.cpu_count()} cores, {platform.machine()}, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"this tree": ROOT, args.against: other}
            times: dict[str, list[float]] = {name: [] for name in trees}
            names = list(trees)
            for r in range(args.rounds):
                for name in names[r % 2:] + names[:r % 2]:
                    times[name].append(_time_help(trees[name]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=True)
    print(f"`python -m guidekit --help`, {args.rounds} rounds\n")
    print("| code | median (s) | min (s) |")
    print("|---|---:|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} |")
    ratio = statistics.median(times["this tree"]) / statistics.median(times[args.against])
    print(f"\nratio of medians (this tree / {args.against}): {ratio:.3f}")


if __name__ == "__main__":
    main()
