"""Which needles a needle-trained run misses: per run, the test needles at the training length counted by kind
(first value token recurring, needle ending the haystack, other) with the misses of each (docs/synthetic_tasks.md).

    python scripts/needle_misses.py outputs/synthetic/needle [--examples 512] [--seed 0]
"""

import argparse
import sys

import torch

from minillm.runs import find_runs, load_model
from minillm.eval.sources import run_task
from minillm.data.synthetic import Needle, needle_misses
from minillm.data.answers import validation_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", help="a run folder, a folder of run folders, or a glob of them")
    parser.add_argument("--examples", type=int, default=512, help="test windows (4 needles each by default)")
    parser.add_argument("--seed", type=int, default=0, help="the test stream's seed")
    args = parser.parse_args()
    try:
        runs = find_runs(args.runs)
        subjects = []
        for run in runs:  # every run checked and loaded before the table starts
            task = run_task(run)
            if not isinstance(task, Needle):
                raise ValueError(f"ckpt: {run.folder} was not trained on the needle task")
            subjects.append((run, task, load_model(run.checkpoint).eval()))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("| run | exact match | recurring: missed / needles | ends haystack | other |")
    print("|---|---|---|---|---|")
    for run, task, model in subjects:
        length = model.cfg.context_length
        inputs, targets, answers = validation_set(task, length, args.examples, args.seed, "test").tensors
        with torch.inference_mode():
            predictions = torch.cat([model(rows).argmax(-1) for rows in inputs.split(64)])
        counts = needle_misses(task, inputs, targets, answers, predictions)
        total = sum(n for n, _ in counts.values())
        right = total - sum(missed for _, missed in counts.values())
        cells = " | ".join(f"{missed} / {n}" for n, missed in counts.values())
        print(f"| {run.name} | {right / total:.1%} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
