"""Wall time of `--help` for both scripts, beside what it costs to import torch (what help imported before
minillm.help) and, with --before REV, the scripts of an earlier commit (a temporary git worktree).

    python benchmarks/help_bench.py [--rounds 7] [--before 35810e9]

Each command is a fresh process, timed in interleaved rounds (the order rotates between rounds), so that a shared
machine's load falls on every peer alike; the table gives the median and the range over rounds. Not part of
benchmarks/run.py: it times process start-up, not a kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peers(before: Path | None) -> dict[str, tuple[list[str], dict]]:
    """name -> (command, extra environment), run from the repository root."""
    found = {
        "train.py --help": ([sys.executable, "scripts/train.py", "--help"], {}),
        "eval_extrapolate.py --help": ([sys.executable, "scripts/eval_extrapolate.py", "--help"], {}),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], {}),
    }
    if before is not None:
        for script in ("train.py", "eval_extrapolate.py"):
            found[f"{script} --help (before)"] = ([sys.executable, str(before / "scripts" / script), "--help"],
                                                  {"PYTHONPATH": str(before)})
    return found


def wall_time(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return elapsed


def measure(commands: dict[str, tuple[list[str], dict]], rounds: int) -> dict[str, list[float]]:
    names = list(commands)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            times[name].append(wall_time(*commands[name]))
    return times


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--before", help="a commit whose scripts' --help is timed too (checked out in a worktree)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        before = None
        if args.before:
            before = Path(scratch) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                           capture_output=True)
        try:
            times = measure(peers(before), args.rounds)
        finally:
            if before is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, capture_output=True)
    width = max(map(len, times))
    print(f"{'command':<{width}}  median (s)  range (s), {args.rounds} interleaved rounds")
    for name, samples in times.items():
        print(f"{name:<{width}}  {statistics.median(samples):10.2f}  {min(samples):.2f}–{max(samples):.2f}")
    return times


if __name__ == "__main__":
    main()
