"""Fine-tuning (init_from=) from another run or an imported model: the settings kept from the source, its weights.

Kept: the shape, vocabulary, norms and tokenizer, the encoding's family (rope.variant) and, unless the command line
names them, its other rope.* settings; an imported model (hf:<folder or hub id>, a .gguf file) keeps every rope.*
setting (its weights were trained with that theta) and, unless the command line names one, its rope_scaling. The
run's own: the context length, the scaling (its trained length defaulting to the source's context length, an
imported model's pretraining length), the position sampler, the optimizer and schedule (fresh), the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import torch

from minillm.model.config import ModelConfig
from minillm.registry import ConfigError
from minillm.runs import CheckpointError, Run, find_runs
from minillm.train.config import RunConfig
from minillm.train.resume import override_keys

if TYPE_CHECKING:  # transformers and tokenizers come with the `interop` extra
    import tokenizers

    from minillm.interop.pretrained import PretrainedSource

# What the source's weights fix: the shape, vocabulary and norms. The encoding's family (rope.variant) is kept too;
# its other settings (theta, ...), the context length and the scaling are the new run's to choose.
KEPT = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_size", "ffn", "ffn_hidden", "norm",
        "norm_eps", "bias", "qkv_bias", "qk_norm", "nope_every", "attn_temperature", "attn_gate", "window",
        "window_layers", "nope_logit_scale", "nope_logit_alpha", "tie_embeddings")


@dataclass
class Source:
    """The run a fine-tuning starts from: its checkpoint's weights and model, with the file's checksum."""

    run: Run  # the run folder and the checkpoint in it
    model: ModelConfig  # the model the checkpoint was trained as
    state: dict  # the Transformer's weights (the checkpoint's "model." entries); emptied once loaded
    step: int  # the training step the checkpoint was saved at
    sha256: str  # the checkpoint file's

    @property
    def name(self) -> str:
        """How messages name it: the run folder."""
        return str(self.run.folder)

    def record(self) -> dict:
        """What the new run's summary and W&B config say of its source."""
        return {"checkpoint": str(self.run.checkpoint.resolve()), "run": self.run.name, "step": self.step,
                "sha256": self.sha256, "context_length": self.model.context_length}

    def group(self) -> str:
        """The W&B group a fine-tuning joins: its source's group, else the source run's folder name."""
        return self.run.wandb_group or self.run.name


@dataclass
class ImportedSource:
    """A pretrained model a fine-tuning starts from (hf:<folder or hub id>, a .gguf file): its weights as our
    Transformer's, its own tokenizer, and the checksums of the files they were read from."""

    given: str  # init_from as the command line named it
    pretrained: "PretrainedSource"  # where it was read from (its transformers config, read once)
    model: ModelConfig  # its context_length is the pretraining length (what a scaling extends by default)
    state: dict  # the Transformer's weights, float32; emptied once loaded
    tokenizer: "tokenizers.Tokenizer"
    path: Path  # the GGUF file, or the folder (a hub id's cached snapshot) the weights were read from
    sha256: dict  # {file name: sha256} of the GGUF file, or of the folder's weight files

    @property
    def name(self) -> str:
        """How messages name it: as the command line did."""
        return self.given

    def record(self) -> dict:
        """What the new run's summary and W&B config say of its source."""
        return {"init_from": self.given, "path": str(self.path.resolve()),
                "format": "gguf" if self.pretrained.gguf else "transformers",
                "architecture": self.pretrained.hf_config().model_type,
                "context_length": self.model.context_length, "sha256": self.sha256}

    def group(self) -> str:
        """The W&B group a fine-tuning joins: the model's name ('SmolLM2-135M-Instruct.Q4_1')."""
        return self.pretrained.name

    def tokenizer_json(self) -> str:
        """The tokenizer as the run folder keeps it: no truncation or padding (windows are cut by the data)."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer.to_str()


AnySource = Union[Source, ImportedSource]


def file_sha256(path: Path) -> str:
    """The file's sha256, read in blocks (a 7B model's weights do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def load_source(init_from: str) -> AnySource:
    """The one training run init_from names (a run folder or a .ckpt), or the model it imports (hf:..., .gguf);
    CheckpointError naming it otherwise."""
    from minillm.interop.pretrained import is_pretrained

    if is_pretrained(init_from):
        return load_imported(init_from)
    try:
        runs = find_runs(init_from)
    except CheckpointError as error:
        hint = " (a transformers folder: init_from=hf:<folder>)" if (Path(init_from) / "config.json").is_file() else ""
        raise CheckpointError(f"{as_init_from(error)}{hint}") from error
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
    return Source(run, model, state, step, file_sha256(run.checkpoint))


def as_init_from(error: Exception) -> str:
    """An import's or a run finder's message ('ckpt: ...', 'ckpt=hf:: ...') as init_from's."""
    message = str(error).splitlines()[0]
    if message.startswith("ckpt="):
        return "init_from=" + message.removeprefix("ckpt=")
    return f"init_from: {message.removeprefix('ckpt: ')}"


def load_imported(init_from: str) -> ImportedSource:
    """The pretrained model init_from names, imported as evaluation imports it (minillm.interop.pretrained); what
    the import refuses (a config it cannot express, a missing or corrupt file, a hub id out of reach) raises
    CheckpointError('init_from: ...') naming it."""
    from minillm.data.tokens import EOS_TOKEN

    try:
        from minillm.interop.pretrained import PretrainedSource

        pretrained = PretrainedSource.parse(init_from)
        imported = pretrained.load()
        files = pretrained.weight_files()
    except ImportError as error:  # transformers or gguf missing: the message says what to install
        raise ConfigError(f"init_from={init_from!r}: {error}") from error
    except ValueError as error:  # CheckpointError, UnsupportedModel: they name the file or field
        raise CheckpointError(as_init_from(error)) from error
    if imported.tokenizer.token_to_id(EOS_TOKEN) is None:  # (data.tokens: a tokenizer.json must have it)
        raise CheckpointError(f"init_from: the tokenizer of {pretrained.describe()} has no {EOS_TOKEN!r} token, "
                              f"which minillm's token streams separate documents with")
    state, model, tokenizer = imported.model.state_dict(), imported.model.cfg, imported.tokenizer
    del imported  # the weights live on in `state` alone: one float32 copy
    path = files[0] if pretrained.gguf else files[0].parent
    return ImportedSource(init_from, pretrained, model, state, tokenizer, path,
                          {file.name: file_sha256(file) for file in files})


def from_source(run: RunConfig, source: AnySource, overrides: Sequence[str], run_tokenizer: Path) -> RunConfig:
    """`run` with the source's shape, vocabulary, encoding and tokenizer. An override on the command line that
    contradicts them raises ConfigError naming it; a scaling's trained length defaults to the source's.

    run_tokenizer: the new run folder's tokenizer.json, where an imported model's tokenizer is written (run.py)
    for the data to read; a run's source is read from its own folder."""
    keys = set(override_keys(overrides))
    for name in KEPT:
        asked, kept = getattr(run.model, name), getattr(source.model, name)
        if f"model.{name}" in keys and asked != kept:
            raise ConfigError(f"model.{name}: init_from={source.name} holds a model with {kept!r}, this run "
                              f"asks for {asked!r}; a fine-tuned run keeps its source's shape")
    imported = isinstance(source, ImportedSource)
    rope = kept_rope(run, source, keys)
    if imported:
        tokenizer = run_tokenizer
        check_imported_tokenizer(run, source, keys)
    else:
        tokenizer = source.run.tokenizer
        if "tokenizer.path" in keys and run.tokenizer.path is not None and \
                Path(run.tokenizer.path).expanduser().read_bytes() != tokenizer.read_bytes():
            raise ConfigError(f"tokenizer.path={run.tokenizer.path!r}: not the tokenizer of init_from="
                              f"{source.name} (its vocabulary is the source's: leave tokenizer.path unset)")
    scaling = run.rope_scaling
    if imported and not any(k == "rope_scaling" or k.startswith("rope_scaling.") for k in keys):
        scaling = source.model.rope_scaling  # the model as published (Llama 3.1's llama3, say), unless asked
    if scaling.name != "none" and scaling.original_max_position is None:
        scaling = dataclasses.replace(scaling, original_max_position=source.model.context_length)
    length = run.model.context_length  # the run's own, as composed (PoSE: the source's window, set explicitly)
    try:
        model = dataclasses.replace(run.model, **{name: getattr(source.model, name) for name in KEPT},
                                    context_length=length, rope=rope, rope_scaling=scaling)
        tuned = dataclasses.replace(run, model=model, rope=rope, rope_scaling=scaling,
                                    tokenizer=dataclasses.replace(run.tokenizer, path=str(tokenizer)))
        tuned.sampler.check(tuned.rope, length)
    except ValueError as error:  # a check between the kept and the new settings (e.g. a scaling's length)
        raise ConfigError(str(error).splitlines()[0]) from error
    return tuned


def kept_rope(run: RunConfig, source: AnySource, keys: set[str]):
    """The encoding a fine-tuning trains with: the source's; rope.* settings the command line names may change
    a run's (not its variant), never an imported model's."""
    named = any(k == "rope" or k.startswith("rope.") for k in keys)
    kept, asked = source.model.rope, run.rope
    if named and asked.variant != kept.variant:
        raise ConfigError(f"rope.variant: init_from={source.name} was trained with {kept.variant!r}, this run asks "
                          f"for {asked.variant!r}; a fine-tuned run keeps its source's encoding" +
                          ("" if isinstance(source, ImportedSource) else " (its other rope.* settings may change)"))
    if not named:
        return kept
    if isinstance(source, ImportedSource):
        for field in dataclasses.fields(kept):
            if getattr(asked, field.name) != getattr(kept, field.name):
                raise ConfigError(f"rope.{field.name}: init_from={source.name} was pretrained with "
                                  f"{getattr(kept, field.name)!r}, this run asks for {getattr(asked, field.name)!r}; "
                                  f"an imported model keeps its encoding (extend it with rope_scaling=...)")
        return kept
    return asked


def check_imported_tokenizer(run: RunConfig, source: ImportedSource, keys: set[str]) -> None:
    """ConfigError naming tokenizer.path where the command line gives a tokenizer other than the model's own (its
    vocabulary and merges). The run reads text with the model's as transformers builds it, which may replace the
    file's normalizer and pre-tokenizer with its class's (Qwen2)."""
    if "tokenizer.path" not in keys or run.tokenizer.path is None:
        return
    from tokenizers import Tokenizer

    try:
        given = Tokenizer.from_file(str(Path(run.tokenizer.path).expanduser()))
    except Exception as error:  # tokenizers raises its own Exception type for unreadable files
        raise ConfigError(f"tokenizer.path={run.tokenizer.path!r}: not a readable tokenizer.json "
                          f"({str(error).splitlines()[0]})") from error
    merges = [json.loads(t.to_str())["model"].get("merges") for t in (given, source.tokenizer)]
    if merges[0] != merges[1] or given.get_vocab(with_added_tokens=True) != source.tokenizer.get_vocab(True):
        raise ConfigError(f"tokenizer.path={run.tokenizer.path!r}: not the tokenizer of init_from={source.name} "
                          f"(the run reads text with the model's own: leave tokenizer.path unset)")


@torch.no_grad()
def load_weights(model: torch.nn.Module, source: AnySource) -> None:
    """The source's weights into the new run's model; a tensor whose shape the new settings change (a learned
    position table of another length, CoPE's npos) raises ConfigError naming it. The source lets go of its copy."""
    own = model.state_dict()
    for name, tensor in source.state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ConfigError(f"init_from: {name} holds {tuple(tensor.shape)} in {source.name}, this run's "
                              f"model needs {tuple(own[name].shape)} (its encoding's size follows "
                              f"model.context_length: keep the source's, or set the encoding's size explicitly)")
    missing, unexpected = model.load_state_dict(source.state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"init_from: the weights of {source.name} do not fit this run's model "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    source.state = {}  # training holds one copy of the weights, the model's
