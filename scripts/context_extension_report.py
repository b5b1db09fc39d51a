"""The tables and plots of docs/context_extension.md from `make context-extension`'s outputs:
python scripts/context_extension_report.py <outputs/context_extension> <docs/context_extension>."""

import shutil
import sys
import tempfile
from pathlib import Path

from minillm.eval.records import Results, read_results
from minillm.eval.study import context_extension_report, plot_context_extension
from minillm.files import write_atomic

# LongRoPE at inference reads each source with the factors searched for it, so each source is evaluated on its own
# (one longrope_factors file per evaluation): eval_inference_longrope/<source>/ beside eval_inference.
PER_SOURCE = "eval_inference_longrope"
# The evaluations' own loss-against-position plots, copied beside the report under these names.
POSITION_PLOTS = {"eval_finetuned": "loss_vs_position_finetuned.png", "eval_inference": "loss_vs_position_inference.png"}


def joined(folder: Path, into: Path) -> Path:
    """`into` laid out as context_extension_report reads a study: folder's eval_finetuned, and eval_inference with
    the records of every per-source evaluation under folder/eval_inference_longrope added."""
    inference = read_results(folder / "eval_inference")
    for source in sorted((folder / PER_SOURCE).glob("*/results.json")):
        inference.extend(read_results(source.parent))
    for name, results in (("eval_finetuned", read_results(folder / "eval_finetuned")), ("eval_inference", inference)):
        (into / name).mkdir(parents=True)
        write_atomic(into / name / "results.json", Results.of_records(results.all()).to_json())
    return into


def main(folder: str, out: str) -> None:
    study, target = Path(folder), Path(out)
    with tempfile.TemporaryDirectory() as scratch:
        view = joined(study, Path(scratch))
        report = context_extension_report(view)
        write_atomic(target / "results.md", report)
        for path in plot_context_extension(view, target):
            print(f"wrote {path}")
    for evaluation, name in POSITION_PLOTS.items():
        plot = study / evaluation / "loss_vs_position.png"
        if plot.is_file():
            shutil.copyfile(plot, target / name)
            print(f"wrote {target / name}")
    print(report)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    try:
        main(*sys.argv[1:])
    except (ValueError, OSError) as error:  # a study folder without an evaluation, an unreadable results.json
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
