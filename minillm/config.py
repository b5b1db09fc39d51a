"""Typed configuration: every setting once, with its default and its check; Hydra's schemas."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from minillm.attention import ATTENTION_METHODS
from minillm.precision import EVAL_PRECISIONS
from minillm.rope import POSITION_ENCODINGS, ModelShape, RotaryConfig, position_config
from minillm.samplers import POSITION_SAMPLERS, sampler_config
from minillm.scaling import SCALINGS, Scaling, scaling_config
from minillm.synthetic import SYNTHETIC_TASKS, TaskConfig


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def _choice(value: str, name: str, allowed) -> None:
    _require(value in allowed, name, f"got {value!r}, expected one of {sorted(allowed)}")


# ----------------------------------------------------------------------------------------------
# The model (conf/model)


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer; the position encoding and its scaling ride along."""

    vocab_size: int = 4096
    context_length: int = 256  # the training sequence length; stored with checkpoints
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (multi-head); fewer: grouped-query
    head_size: Optional[int] = None  # channels per head; None: d_model / n_heads (Qwen3 sets it apart)
    ffn: str = "swiglu"  # swiglu (LLaMA) | gelu (GPT-2)
    ffn_hidden: Optional[int] = None  # None: 4*d_model for gelu, 8/3*d_model rounded to 64 for swiglu
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    bias: bool = False  # biases in every linear layer and LayerNorm
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before the rotation (arXiv:2302.05442; Qwen3)
    nope_every: Optional[int] = None  # every n-th layer (n, 2n, ...) sees no positions (Llama 4's iRoPE); None: none
    attn_temperature: str = "none"  # none | logn (Qwen's log-n) | ssmax (Scalable-Softmax): queries scaled by position
    tie_embeddings: bool = True
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    init_std: float = 0.02
    rope: Any = field(default_factory=RotaryConfig)  # a registered PositionConfig (minillm.rope)
    rope_scaling: Any = field(default_factory=Scaling)  # a registered Scaling (minillm.scaling)

    def __post_init__(self) -> None:
        # Hydra hands nested configs over as DictConfig or dict; normalise to the dataclasses.
        self.rope = position_config(self.rope)
        self.rope_scaling = scaling_config(self.rope_scaling)
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            _require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        if self.head_size is None:
            _require(self.d_model % self.n_heads == 0, "model.n_heads",
                     f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        else:
            _require(self.head_size > 0, "model.head_size", f"must be positive, got {self.head_size}")
        _require(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0, "model.n_kv_heads",
                 f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        _choice(self.ffn, "model.ffn", ("swiglu", "gelu"))
        _choice(self.norm, "model.norm", ("rmsnorm", "layernorm"))
        if self.ffn_hidden is not None:
            _require(self.ffn_hidden > 0, "model.ffn_hidden", f"must be positive, got {self.ffn_hidden}")
        for name in ("attn_dropout", "resid_dropout"):
            _require(0.0 <= getattr(self, name) < 1.0, f"model.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.norm_eps > 0, "model.norm_eps", f"must be positive, got {self.norm_eps}")
        _require(self.init_std > 0, "model.init_std", f"must be positive, got {self.init_std}")
        _choice(self.attn_temperature, "model.attn_temperature", ("none", "logn", "ssmax"))
        _require(self.attn_temperature == "none" or self.context_length >= 2, "model.attn_temperature",
                 f"scales by log_L with L = model.context_length, which must be at least 2 (got {self.context_length})")
        if self.nope_every is not None:
            _require(self.nope_every >= 1, "model.nope_every", f"must be at least 1, got {self.nope_every}")
            _require(not self.rope.absolute, "model.nope_every",
                     f"position-free layers need a per-layer encoding (rotary or a bias); {self.rope.variant!r} "
                     f"adds positions to the token embeddings, which every layer then sees")
        self.rope.validate(self.shape, self.rope_scaling)

    @property
    def shape(self) -> ModelShape:
        """What the position encoding is told of the model."""
        return ModelShape(self.d_model, self.n_heads, self.head_dim, self.context_length, self.init_std,
                          tuple(layer for layer in range(self.n_layers) if not self.position_free(layer)))

    @property
    def label(self) -> str:
        """A short name for what a model was trained with: 'complex θ=1e+04', 'xpos(complex) γ=512', 'alibi', ..."""
        nope = f" nope/{self.nope_every}" if self.nope_every is not None else ""
        temperature = f" {self.attn_temperature}" if self.attn_temperature != "none" else ""
        return self.rope.label + self.rope_scaling.label + nope + temperature

    def position_free(self, layer: int) -> bool:
        """Whether layer (0-based) is one of the nope_every-th layers, which see no positions."""
        return self.nope_every is not None and (layer + 1) % self.nope_every == 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)  # LLaMA: 2/3 of 4d, rounded up to 64

    def to_dict(self) -> dict:
        """Plain types only, so checkpoints load with torch.load(weights_only=True)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}; known fields are {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Data and tokenizer (conf/data, conf/tokenizer)


SYNTHETIC = "synthetic"  # data.path of the generated tasks

# Every synthetic task's knobs, one field per registered task (its config class): the schema of `data.tasks`.
TaskSettings = make_dataclass("TaskSettings", [(name, cls, field(default_factory=cls))
                                               for name, cls in SYNTHETIC_TASKS.items()])
TaskSettings.__module__ = __name__  # so it pickles by reference (a parallel sweep's workers import it)


@dataclass
class DataConfig:
    """Which text (or synthetic task) to train on and how it is cut into windows."""

    # "stdlib" (the embedded corpus), a HuggingFace hub name, a local file (.txt, .jsonl, .json,
    # .parquet), a folder of such files, or a folder written by Dataset.save_to_disk; "synthetic": data.task.
    path: str = "stdlib"
    # With path=synthetic (data=synthetic): the task generated on the fly (minillm.synthetic), with its knobs
    # under data.tasks.<task>, e.g. data.task=copy data.tasks.copy.num_symbols=16.
    task: Optional[str] = None
    tasks: "TaskSettings" = field(default_factory=lambda: TaskSettings())
    name: Optional[str] = None  # the hub dataset's config name
    split: str = "train"
    # The split to validate on; None: a local dataset's "validation" split if it has one, else documents of
    # data.split held out by hash (val_fraction).
    val_split: Optional[str] = None
    text_field: str = "text"
    streaming: bool = False  # hub sets too large to download whole
    max_documents: Optional[int] = None  # None: all; required with streaming
    val_fraction: float = 0.05  # by document, chosen by a hash of its text
    val_windows: int = 32  # fixed validation windows of context_length + 1 tokens (synthetic: examples)
    long_documents: int = 16  # longest validation documents kept for the extrapolation evaluation
    batch_size: int = 16
    num_workers: int = 0
    cache_dir: str = "~/.cache/minillm"

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.path", "must name a dataset, a file, 'stdlib' or 'synthetic'")
        if self.synthetic:
            _require(self.task is not None, "data.task", f"data.path=synthetic needs a task: one of "
                     f"{sorted(SYNTHETIC_TASKS)}")
            _choice(self.task, "data.task", SYNTHETIC_TASKS)
        else:
            _require(self.task is None, "data.task", f"names a synthetic task, read only with data=synthetic "
                     f"(data.path=synthetic), not data.path={self.path!r}")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _require(self.val_split is None or (bool(self.val_split) and self.val_split != self.split), "data.val_split",
                 f"must name a split other than data.split ({self.split!r}), got {self.val_split!r}")
        for name in ("val_windows", "batch_size", "long_documents"):
            _require(getattr(self, name) > 0, f"data.{name}", f"must be positive, got {getattr(self, name)}")
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.max_documents is not None:
            _require(self.max_documents > 0, "data.max_documents", f"must be positive, got {self.max_documents}")
        _require(not self.streaming or self.max_documents is not None, "data.max_documents",
                 "must be set when data.streaming is true (a stream has no end to tokenize up to)")

    @property
    def synthetic(self) -> bool:
        return self.path == SYNTHETIC

    @property
    def synthetic_task(self) -> TaskConfig:
        """The synthetic task with its knobs (data=synthetic only)."""
        return getattr(self.tasks, self.task)


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the training split, or a given tokenizer.json."""

    path: Optional[str] = None  # a tokenizer.json; None: train one on the training split
    vocab_size: int = 4096
    min_frequency: int = 2

    def __post_init__(self) -> None:
        _require(self.vocab_size >= 260, "tokenizer.vocab_size",
                 f"must be at least 260 (256 bytes plus special tokens), got {self.vocab_size}")
        _require(self.min_frequency >= 1, "tokenizer.min_frequency", f"must be >= 1, got {self.min_frequency}")


# ----------------------------------------------------------------------------------------------
# Optimisation, trainer, logger (conf/optim, conf/trainer, conf/logger)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio · lr."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1  # on matrices only: never on norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


def _valid_devices(devices: Any, cpu: bool) -> bool:
    """What Lightning's Trainer(devices=...) accepts: 'auto', a count, -1 (all GPUs), or GPU indices."""
    if devices == "auto":
        return True
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, (int, list, tuple, str)):
        return False
    if isinstance(devices, int):
        if cpu:  # one process per count: more than the machine's cores only oversubscribes (and a huge count exhausts memory)
            return 0 < devices <= (os.cpu_count() or 1)
        return devices > 0 or devices == -1
    if cpu:
        return False
    indices = devices.split(",") if isinstance(devices, str) else devices
    return len(indices) > 0 and all(str(i).strip().isdigit() for i in indices)


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets, plus the checkpoint cadence and compilation."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    # auto: bf16-mixed where the processor multiplies bf16 natively (AVX-512 BF16, AMX; a GPU with bf16), float32
    # elsewhere (minillm.precision); a Lightning precision is taken as asked.
    precision: str = "auto"
    max_steps: int = 1000
    val_check_interval: int = 100  # steps between validations
    limit_val_batches: Optional[int] = None
    log_every_n_steps: int = 10
    gradient_clip_val: float = 1.0
    checkpoint_every_n_steps: int = 250
    max_bad_steps: int = 0  # steps with a NaN/inf loss to skip (no update) before the run stops
    compile: bool = False  # torch.compile the model
    peak_flops: Optional[float] = None  # for MFU; None: measured on CPU, looked up for known GPUs

    def __post_init__(self) -> None:
        for name in ("max_steps", "val_check_interval", "log_every_n_steps", "checkpoint_every_n_steps", "num_nodes"):
            _require(getattr(self, name) > 0, f"trainer.{name}", f"must be positive, got {getattr(self, name)}")
        _require(self.gradient_clip_val >= 0, "trainer.gradient_clip_val", f"must be >= 0, got {self.gradient_clip_val}")
        _require(self.max_bad_steps >= 0, "trainer.max_bad_steps", f"must be >= 0, got {self.max_bad_steps}")
        _choice(self.accelerator, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
        _require(_valid_devices(self.devices, cpu=self.accelerator == "cpu"), "trainer.devices",
                 f"got {self.devices!r}, expected 'auto', a positive count" +
                 (f" (the CPU takes a count of processes, at most this machine's {os.cpu_count() or 1} cores)"
                  if self.accelerator == "cpu" else
                  ", -1 for all, or a list of device indices"))
        _choice(self.precision, "trainer.precision",
                ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true"))
        if self.peak_flops is not None:
            _require(self.peak_flops > 0, "trainer.peak_flops", f"must be positive, got {self.peak_flops}")


@dataclass
class LoggerConfig:
    """Where metrics go: W&B (offline without an API key), a CSV file, or nowhere but the run folder."""

    kind: str = "wandb"  # wandb | csv | none
    project: str = "minillm"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto: online with an API key, offline otherwise | online | offline | disabled

    def __post_init__(self) -> None:
        _choice(self.kind, "logger.kind", ("wandb", "csv", "none"))
        _choice(self.mode, "logger.mode", ("auto", "online", "offline", "disabled"))


@dataclass
class RunConfig:
    """The whole training run, as Hydra composes it from conf/."""

    model: ModelConfig = field(default_factory=ModelConfig)
    rope: Any = None  # a registered PositionConfig (conf/rope picks one); None: RoPE defaults
    rope_scaling: Any = None  # a registered Scaling (conf/rope_scaling picks one); None: no scaling
    positions: Any = None  # a registered PositionSampler (conf/positions picks one); None: contiguous
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    ckpt_path: Optional[str] = None  # "last" resumes this run folder's last checkpoint; or a path
    # A run folder or .ckpt whose weights start this run (fresh optimizer and schedule): its shape, vocabulary,
    # encoding and tokenizer are kept; the context length, scaling and positions are this run's (minillm.finetune).
    init_from: Optional[str] = None
    verbose: bool = False  # show the libraries' console lines too (devices, tips, deprecations)

    def __post_init__(self) -> None:
        # The top-level rope / rope_scaling groups are the source; the model carries them.
        self.rope = RotaryConfig() if self.rope is None else position_config(self.rope)
        self.rope_scaling = scaling_config(self.rope_scaling)
        for name, default in (("rope", RotaryConfig()), ("rope_scaling", Scaling())):
            given = getattr(self.model, name)
            if given != default and given != getattr(self, name):
                raise ValueError(f"model.{name}: set the top-level {name} group instead (e.g. {name}.<field>=...)")
        self.model = dataclasses.replace(self.model, rope=self.rope, rope_scaling=self.rope_scaling)
        self.positions = sampler_config(self.positions)
        if self.data.synthetic:  # the task's prompt must fit the training windows (and its knobs agree)
            self.data.synthetic_task.check_length(self.model.context_length)
        if self.init_from is None:  # a fine-tuning is checked once its source's settings are in (minillm.finetune)
            self.sampler.check(self.rope, self.model.context_length)

    @property
    def sampler(self):
        """The position sampler with its reach resolved (PoSE's target: the scaling's extended length)."""
        return self.positions.resolved(self.model.context_length, self.rope_scaling)


def folder_name(override_dirname: str, limit: int = 200) -> str:
    """Hydra's override_dirname as one folder name that a command line can pass back unquoted
    (hydra.run.dir=<job folder>, ckpt=<job folder>): 'rope=alibi,seed=1' -> 'rope-alibi__seed-1'. '/' in a value
    would nest folders and '=', ',' or brackets would need quoting; a name over the file systems' 255-byte
    limit cannot be created, so long names keep a hash for uniqueness."""
    name = re.sub(r"[^\w.+\-]", "_", override_dirname.replace(",", "__").replace("=", "-"))
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name.encode()[:limit - 9].decode(errors='ignore')}-{digest}"


HELP = """{script}: {purpose}

Choose an option of a group with group=option, set any value with key=value (the defaults are below).
{groups}
Every group and setting is described in the README ("Configuration groups"); the dataclasses in minillm/
hold the defaults and checks.

== Config ==
$CONFIG
"""


def help_text(conf_dir: Path, script: str, purpose: str, groups: list[str]) -> str:
    """--help for a script: its groups and their options (the files in conf/), without internal schemas."""
    lines = [f"  {group}: {', '.join(sorted(p.stem for p in (conf_dir / group).glob('*.yaml')))}" for group in groups]
    return HELP.format(script=script, purpose=purpose, groups="\n".join(["Groups:", *lines]))


def register_configs(conf_dir: Optional[Path] = None) -> None:
    """Put the schemas in Hydra's ConfigStore (conf/ YAML files extend them and never restate defaults), and
    the resolvers the YAML uses (folder names; --help from conf_dir's groups)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("folder_name"):
        OmegaConf.register_new_resolver("folder_name", folder_name)
    if conf_dir is not None:
        OmegaConf.register_new_resolver(
            "help", lambda script, purpose, *groups: help_text(conf_dir, script, purpose, list(groups)), replace=True)

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="eval_schema", node=EvalConfig)
    # One schema per registered name, derived from its class: conf/rope/<name>.yaml extends /schema/rope/<name>.
    # Their own group, so that rope= offers the YAML files only.
    for name, cls in POSITION_ENCODINGS.items():
        store.store(group="schema/rope", name=name, node=cls(variant=name))
    for name, cls in SCALINGS.items():
        store.store(group="schema/rope_scaling", name=name, node=cls)
    for name, cls in POSITION_SAMPLERS.items():
        store.store(group="schema/positions", name=name, node=cls)


# Every attention method's knobs, one field per registered method (its config class): the schema of `methods`.
AttentionSettings = make_dataclass("AttentionSettings", [(name, cls, field(default_factory=cls))
                                                         for name, cls in ATTENTION_METHODS.items()])


@dataclass
class EvalConfig:
    """Length-extrapolation evaluation of trained checkpoints (scripts/eval_extrapolate.py)."""

    # a .ckpt, a run folder, a multirun folder (or a glob of them); hf:<folder or hub id>, or a .gguf file, to
    # import a pretrained model (minillm.pretrained); or a list of these
    ckpt: Any = None
    # The text imported models are read on (trained runs read their own run's validation documents).
    data: DataConfig = field(default_factory=DataConfig)
    trained_length: Optional[int] = None  # imported models' 1x; None: their config's (original) context length
    lengths: Optional[list[int]] = None  # None: 1, 2, 4, 8, 16 × each model's training length
    # applied to rotary models only; every scaling a factor defines (not longrope: its factors are searched per model)
    scalings: list[str] = field(default_factory=lambda: [name for name, cls in SCALINGS.items() if cls.from_factor])
    scaling_factor: Optional[float] = None  # None: eval length / trained length (dynamic_ntk: 1)
    attention: list[str] = field(default_factory=lambda: ["full"])  # methods in minillm.attention
    methods: "AttentionSettings" = field(default_factory=lambda: AttentionSettings())  # methods.self_extend.group=4
    logn: bool = False  # scale queries by max(1, log_L(i + 1)) (Qwen's log-n) under every method and scaling
    tail_loss: bool = True  # also the loss on each document's last L tokens with 1x..16x L of context (ReRoPE's)
    stride: Optional[int] = None  # sliding-window evaluation (ALiBi paper); None: non-overlapping windows
    max_documents: int = 8  # long validation documents evaluated at every length
    batch_size: int = 4
    buckets: int = 16  # loss-against-position resolution
    passkey_trials: int = 10  # per (length, depth); 0 turns passkey retrieval off
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    # Runs trained on a synthetic task (data=synthetic) are scored on its test examples instead of on text.
    task_examples: int = 64  # test examples per length
    effective_threshold: float = 0.9  # effective length: the share of the 1x exact match each length up to it keeps
    # ... defined only for runs whose 1x exact match reaches this: below it the run did not learn the task
    effective_min_exact_match: float = 0.5
    device: str = "auto"  # auto: cuda when available
    # auto: bf16 matmuls where the processor multiplies bf16 natively (minillm.precision), float32 elsewhere
    precision: str = "auto"
    seed: int = 0
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    verbose: bool = False  # show the libraries' console lines too

    def __post_init__(self) -> None:
        _require(self.ckpt not in (None, "", []), "ckpt", "name a checkpoint, a run folder or a multirun folder")
        if self.lengths is not None:
            _require(len(self.lengths) > 0 and all(n >= 1 for n in self.lengths), "lengths",
                     f"must be positive token counts, got {list(self.lengths)}")
        if self.trained_length is not None:
            _require(self.trained_length >= 1, "trained_length", f"must be a positive token count, got "
                     f"{self.trained_length}")
        for method in self.scalings:
            _choice(method, "scalings", SCALINGS)
            _require(SCALINGS[method].from_factor, "scalings", f"{method} needs factors searched for the model (a "
                     f"checkpoint trained or imported with rope_scaling={method} keeps them: evaluate it with none)")
        for method in self.attention:
            _choice(method, "attention", ATTENTION_METHODS)
        if self.scaling_factor is not None:
            _require(self.scaling_factor > 0, "scaling_factor", f"must be positive, got {self.scaling_factor}")
        if self.stride is not None:
            _require(self.stride > 0, "stride", f"must be positive, got {self.stride}")
        for name in ("max_documents", "batch_size", "buckets", "task_examples"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.passkey_trials >= 0, "passkey_trials", f"must be >= 0, got {self.passkey_trials}")
        _require(all(0 <= d <= 1 for d in self.passkey_depths), "passkey_depths",
                 f"must lie in [0, 1], got {list(self.passkey_depths)}")
        _require(0 < self.effective_threshold <= 1, "effective_threshold",
                 f"must lie in (0, 1] (a share of the exact match at the training length), got "
                 f"{self.effective_threshold}")
        _require(0 <= self.effective_min_exact_match <= 1, "effective_min_exact_match",
                 f"must lie in [0, 1] (an exact match at the training length), got {self.effective_min_exact_match}")
        _choice(self.device, "device", ("auto", "cpu", "cuda", "mps"))
        _choice(self.precision, "precision", EVAL_PRECISIONS)

    def method(self, name: str):
        """The attention method `name` with its knobs from `methods`."""
        return getattr(self.methods, name)

    @property
    def checkpoints(self) -> list[str]:
        return [self.ckpt] if isinstance(self.ckpt, str) else list(self.ckpt)


class ConfigError(ValueError):
    """A configuration that composed but does not make sense; the message names the setting."""


def to_run_config(cfg):
    """Hydra's tree (a DictConfig) -> the validated dataclasses (each __post_init__ checks its own fields)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:  # our ValueError may arrive wrapped; unwrap it for a clean message
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(str(error.__cause__).splitlines()[0]) from error
        # OmegaConf's own (e.g. "Interpolation key 'x' not found") names the setting on a later line: lead with it.
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}" if key else str(error).splitlines()[0]) from error
    except ValueError as error:  # a dataclass's __post_init__ check, raised as is: it names the setting
        raise ConfigError(str(error).splitlines()[0]) from error
