"""Fine-tuning from another run (init_from=): the settings kept from the source, the weights it starts from.

Kept: the shape, vocabulary and tokenizer, the encoding's family (rope.variant) and, unless the command line
names them, its other rope.* settings. The run's own: the context length, the scaling (its trained length
defaulting to the source's context length), the position sampler, the optimizer and schedule (fresh).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from minillm.model.config import ModelConfig
from minillm.registry import ConfigError
from minillm.runs import CheckpointError, Run, find_runs
from minillm.train.config import RunConfig
from minillm.train.resume import override_keys

# What the source's weights fix: the shape and vocabulary. The encoding's family (rope.variant) is kept too;
# its other settings (theta, ...), the context length and the scaling are the new run's to choose.
KEPT = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_size", "ffn", "ffn_hidden", "norm",
        "bias", "qkv_bias", "qk_norm", "nope_every", "attn_temperature", "tie_embeddings")


@dataclass
class Source:
    """The run a fine-tuning starts from: its checkpoint's weights and model, with the file's checksum."""

    run: Run
    model: ModelConfig
    state: dict  # the Transformer's weights (the checkpoint's "model." entries)
    step: int
    sha256: str

    def record(self) -> dict:
        """What the new run's summary and W&B config say of its source."""
        return {"checkpoint": str(self.run.checkpoint.resolve()), "run": self.run.name, "step": self.step,
                "sha256": self.sha256, "context_length": self.model.context_length}


def load_source(init_from: str) -> Source:
    """The one training run init_from names (a run folder or a .ckpt); CheckpointError naming it otherwise."""
    try:
        runs = find_runs(init_from)
    except CheckpointError as error:
        raise CheckpointError(f"init_from: {str(error).removeprefix('ckpt: ')}") from error
    if len(runs) != 1:
        raise CheckpointError(f"init_from={init_from!r} names {len(runs)} runs ({', '.join(r.name for r in runs[:3])}"
                              f"{', ...' if len(runs) > 3 else ''}); name one run folder or checkpoint")
    run = runs[0]
    if not run.tokenizer.is_file():
        raise CheckpointError(f"init_from: {run.folder} has no tokenizer.json, so its vocabulary is unknown "
                              f"(name a training run folder or a checkpoint inside one)")
    try:
        model, state, step = run.model_config, run.weights, run.step
    except CheckpointError as error:
        raise CheckpointError(f"init_from: {error}") from error
    digest = hashlib.sha256(run.checkpoint.read_bytes()).hexdigest()
    return Source(run, model, state, step, digest)


def from_source(run: RunConfig, source: Source, overrides: Sequence[str]) -> RunConfig:
    """`run` with the source's shape, vocabulary, encoding family and tokenizer. An override on the command line
    that contradicts them raises ConfigError naming it; a scaling's trained length defaults to the source's."""
    keys = set(override_keys(overrides))
    for name in KEPT:
        asked, kept = getattr(run.model, name), getattr(source.model, name)
        if f"model.{name}" in keys and asked != kept:
            raise ConfigError(f"model.{name}: init_from={source.run.folder} holds a model with {kept!r}, this run "
                              f"asks for {asked!r}; a fine-tuned run keeps its source's shape")
    rope = run.rope
    if rope.variant != source.model.rope.variant:
        if any(k == "rope" or k.startswith("rope.") for k in keys):
            raise ConfigError(f"rope.variant: init_from={source.run.folder} was trained with "
                              f"{source.model.rope.variant!r}, this run asks for {rope.variant!r}; a fine-tuned run "
                              f"keeps its source's encoding (its other rope.* settings may change)")
        rope = source.model.rope
    elif not any(k == "rope" or k.startswith("rope.") for k in keys):
        rope = source.model.rope  # the source's settings (theta, ...) unless asked otherwise
    tokenizer = str(source.run.tokenizer)
    if "tokenizer.path" in keys and run.tokenizer.path is not None and \
            Path(run.tokenizer.path).expanduser().read_bytes() != source.run.tokenizer.read_bytes():
        raise ConfigError(f"tokenizer.path={run.tokenizer.path!r}: not the tokenizer of init_from="
                          f"{source.run.folder} (its vocabulary is the source's: leave tokenizer.path unset)")
    scaling = run.rope_scaling
    if scaling.name != "none" and scaling.original_max_position is None:
        scaling = dataclasses.replace(scaling, original_max_position=source.model.context_length)
    length = run.model.context_length  # the run's own, as composed (PoSE: the source's window, set explicitly)
    try:
        model = dataclasses.replace(run.model, **{name: getattr(source.model, name) for name in KEPT},
                                    context_length=length, rope=rope, rope_scaling=scaling)
        tuned = dataclasses.replace(run, model=model, rope=rope, rope_scaling=scaling,
                                    tokenizer=dataclasses.replace(run.tokenizer, path=tokenizer))
        tuned.sampler.check(tuned.rope, length)
    except ValueError as error:  # a check between the kept and the new settings (e.g. a scaling's length)
        raise ConfigError(str(error).splitlines()[0]) from error
    return tuned


def source_group(source: Source) -> str:
    """The W&B group a fine-tuning joins: its source's group, else the source run's folder name."""
    return source.run.wandb_group or source.run.name


@torch.no_grad()
def load_weights(model: torch.nn.Module, source: Source) -> None:
    """The source's weights into the new run's model; a tensor whose shape the new settings change (a learned
    position table of another length, CoPE's npos) raises ConfigError naming it."""
    own = model.state_dict()
    for name, tensor in source.state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ConfigError(f"init_from: {name} holds {tuple(tensor.shape)} in {source.run.folder}, this run's "
                              f"model needs {tuple(own[name].shape)} (its encoding's size follows "
                              f"model.context_length: keep the source's, or set the encoding's size explicitly)")
    missing, unexpected = model.load_state_dict(source.state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"init_from: the weights of {source.run.folder} do not fit this run's model "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
