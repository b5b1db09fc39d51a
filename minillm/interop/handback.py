"""A run's model, or an imported one, handed back to the ecosystems it may have come from: a transformers folder
(save_pretrained, with its tokenizer) or an unquantized GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from minillm.interop.export import save_hf_folder
from minillm.interop.gguf_export import DTYPES, write_gguf
from minillm.interop.pretrained import is_pretrained, load_pretrained
from minillm.runs import CheckpointError, find_runs

FORMATS = ("hf", "gguf")


def check_request(format: str, out: str, dtype: str) -> Path:
    """Refuse a bad format, dtype or output path before anything is read; the output path otherwise."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: expected one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if not out:
        raise ValueError("out: name the folder (format=hf) or the .gguf file (format=gguf) to write")
    path = Path(out).expanduser()
    if format == "gguf":
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"out={out!r}: a GGUF file's name ends in .gguf")
        if path.is_dir():
            raise ValueError(f"out={out!r} is a folder: name a .gguf file")
    return path


def read_model(ckpt: str):
    """(model, tokenizers.Tokenizer, name) of a run folder or .ckpt (its run folder's tokenizer.json), or of an
    imported source (hf:<folder or hub id>, <file>.gguf) with its own tokenizer."""
    from tokenizers import Tokenizer

    if is_pretrained(ckpt):
        pretrained = load_pretrained(ckpt)
        return pretrained.model, pretrained.tokenizer, pretrained.source.name
    runs = find_runs(ckpt)
    if len(runs) != 1:
        raise CheckpointError(f"ckpt={ckpt!r} holds {len(runs)} runs: name one run folder or checkpoint to export")
    run = runs[0]
    if not run.tokenizer.is_file():
        raise CheckpointError(f"ckpt: {run.checkpoint} has no tokenizer.json in its run folder ({run.tokenizer}); "
                              f"an export carries the run's tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(run.tokenizer))
    except Exception as error:  # the Rust side raises a bare Exception for any parse failure
        raise CheckpointError(f"ckpt: {run.tokenizer} is not a valid tokenizer.json ({error})") from error
    return run.load_model(), tokenizer, run.name


def export(ckpt: str, format: str, out: str, dtype: str = "f32", eos_token: Optional[str] = None) -> Path:
    """Export `ckpt` to `out` as format (hf or gguf) in dtype (f32, f16, bf16); eos_token: the tokenizer's end of
    sequence (and padding) where its vocabulary has it. Raises ValueError naming the setting for what the target
    cannot express, before `out` is touched."""
    path = check_request(format, out, dtype)
    model, tokenizer, name = read_model(ckpt)
    if format == "gguf":
        return write_gguf(model, tokenizer, path, dtype=dtype, name=name, eos_token=eos_token)
    return save_hf_folder(model, tokenizer, path, eos_token, dtype=DTYPES[dtype][1])
