"""The factors a LongRoPE search leaves (minillm.eval.longrope_search): which model they were searched for, where
an evaluation finds them, and the checks before it reads a model with them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from minillm.positions.scaling import LongRopeScaling
from minillm.registry import require

RESULT_NAME = "longrope.json"  # the result's name in a run folder, where an evaluation looks for it by default


def model_identity(location: str) -> dict:
    """{"path", "sha256"} of a model's file (a .ckpt, a .gguf) or, for a transformers folder, of its config.json
    and weights in name order; sha256 None for a hub id (nothing local to hash)."""
    path = Path(location).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    else:
        return {"path": location, "sha256": None}
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"path": str(path.resolve()), "sha256": digest.hexdigest()}


def default_result(location: str, is_run: bool) -> Path:
    """Where a search writes its result when out= is not given, and where an evaluation looks for one."""
    if is_run:
        from minillm.runs import RunFolder

        return RunFolder.of_checkpoint(location).path / RESULT_NAME
    return Path("outputs/longrope") / Path(location).stem / RESULT_NAME


def searched_scaling(location: str, is_run: bool, trained: int, factors: Optional[str],
                     setting: str = "scalings") -> LongRopeScaling:
    """The longrope scaling an evaluation reads the model at `location` with: the result file `factors`, else the
    run folder's longrope.json; refused by name when there is none, or when it was searched for another model."""
    result = Path(factors).expanduser() if factors is not None else (
        default_result(location, True) if is_run else None)
    if factors is not None:
        require(result.is_file(), "longrope_factors", f"{result} does not exist")
    require(result is not None and result.is_file(), setting, f"longrope needs factors searched for {location}: "
            f"run scripts/longrope_search.py ckpt={location} (or name a result with longrope_factors=<file>)")
    scaling = LongRopeScaling(factors=str(result))
    written = json.loads(result.read_text()).get("model") or {}
    ours = model_identity(location)
    same = written.get("sha256") == ours["sha256"] if ours["sha256"] else written.get("path") == ours["path"]
    require(same, "longrope_factors", f"{result} was searched for "
            f"{written.get('path')} (sha256 {str(written.get('sha256'))[:12]}), not {ours['path']} (sha256 "
            f"{str(ours['sha256'])[:12]}): search this model's factors")
    require(scaling.original == trained, "longrope_factors", f"{result} was searched at a trained length of "
            f"{scaling.original}, this model is read at {trained}")
    return scaling


def subject_longrope(subject, factors: Optional[str]) -> LongRopeScaling:
    """searched_scaling for an evaluation's Subject (a run's checkpoint is its .ckpt, an import's its location)."""
    checkpoint = subject.setting.checkpoint
    return searched_scaling(checkpoint, checkpoint.endswith(".ckpt"), subject.setting.trained_length, factors)


def searched_for(ckpt: str, trained: int, factors: Optional[str]) -> LongRopeScaling:
    """searched_scaling for the one model the harness's `ckpt` names (a run folder, .ckpt, hf:, .gguf)."""
    from minillm.interop.pretrained import PretrainedSource, is_pretrained
    from minillm.runs import find_runs

    if is_pretrained(ckpt):
        return searched_scaling(PretrainedSource.parse(ckpt).location, False, trained, factors, "scaling")
    return searched_scaling(str(find_runs(ckpt)[0].checkpoint), True, trained, factors, "scaling")
