"""The tables and plots of docs/context_extension.md from `make context-extension`'s outputs:
python scripts/context_extension_report.py <outputs/context_extension> <docs/context_extension>."""

import sys
from pathlib import Path

from minillm.files import write_atomic
from minillm.eval.study import context_extension_report, plot_context_extension


def main(folder: str, out: str) -> None:
    report = context_extension_report(Path(folder))
    write_atomic(Path(out) / "results.md", report)
    for path in plot_context_extension(Path(folder), Path(out)):
        print(f"wrote {path}")
    print(report)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
