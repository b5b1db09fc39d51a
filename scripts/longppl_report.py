"""LongPPL against the synthetic effective length across a study's encodings (docs/long_context_eval.md):
python scripts/longppl_report.py <text evaluation> <task evaluation> <out folder> [length ...]."""

import sys
from pathlib import Path

from minillm.console import fail
from minillm.eval.study import longppl_correlation_report
from minillm.files import write_atomic


def main(text_folder: str, task_folder: str, out: str, *lengths: str) -> None:
    report = longppl_correlation_report(Path(text_folder), Path(task_folder), [int(n) for n in lengths] or None)
    write_atomic(Path(out) / "longppl_correlation.md", report)
    print(report)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except (ValueError, OSError, KeyboardInterrupt) as error:  # a missing results.json, a bad length: one line
        fail(error if not isinstance(error, KeyboardInterrupt) else ValueError("interrupted: nothing written"))
