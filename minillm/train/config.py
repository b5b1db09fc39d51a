"""The training run's settings: optimizer, trainer, and the whole run as Hydra composes it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from minillm.data.config import DataConfig, TokenizerConfig
from minillm.model.config import ModelConfig, ModelSettings
from minillm.positions.base import position_config
from minillm.positions.rotary import RotaryConfig
from minillm.positions.samplers import sampler_config
from minillm.positions.scaling import Scaling, scaling_config
from minillm.registry import choice, finite, positive, require
from minillm.tracking import LoggerConfig
from minillm.train.lora import LoraConfig

# ----------------------------------------------------------------------------------------------
# Optimisation, trainer, logger (conf/optim, conf/trainer, conf/logger)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio · lr."""

    lr: float = 3e-3  # the peak learning rate, reached after the warm-up
    min_lr_ratio: float = 0.1  # the learning rate at trainer.max_steps, as a fraction of lr
    weight_decay: float = 0.1  # on matrices only: never on norms, biases or embeddings
    beta1: float = 0.9  # AdamW's decay of the gradient's running mean
    beta2: float = 0.95  # AdamW's decay of the squared gradient's running mean
    eps: float = 1e-8  # added to AdamW's denominator
    warmup_steps: int = 100  # steps of linear warm-up to lr (then cosine decay)

    def __post_init__(self) -> None:
        positive(self.lr, "optim.lr")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                 f"must be a finite number >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        positive(self.eps, "optim.eps")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        finite(self, "optim")


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


def _valid_batch_limit(limit: Any) -> bool:
    """A positive count of validation batches, or a fraction of them in (0, 1]. Lightning takes 0 too (no
    validation): refused here, as val/loss, which the best checkpoint follows, would never be measured."""
    if isinstance(limit, bool):
        return False
    if isinstance(limit, int):
        return limit > 0
    return isinstance(limit, float) and 0 < limit <= 1


SHARDINGS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")  # torch FSDP's ShardingStrategy names


@dataclass
class TrainerConfig:
    """What Lightning's Trainer gets, plus the checkpoint cadence and compilation."""

    accelerator: str = "cpu"  # auto | cpu | gpu | cuda | mps | tpu
    devices: Any = 1  # auto, a count (the CPU: processes, at most its cores), -1 for every GPU, or GPU indices
    num_nodes: int = 1  # machines in a multi-node run
    strategy: str = "auto"  # auto, or one of Lightning's registered strategies (ddp, fsdp, deepspeed, ...)
    # Lightning's precision (32-true, bf16-mixed, ...); auto: bf16-mixed where bf16 is native, else 32-true
    precision: str = "auto"
    max_steps: int = 1000  # optimizer steps to train for (the schedule ends there)
    val_check_interval: int = 100  # steps between validations
    limit_val_batches: Optional[Union[int, float]] = None  # batches per validation, or a fraction in (0, 1]; None: all
    log_every_n_steps: int = 10  # steps between logged training metrics
    gradient_clip_val: float = 1.0  # clip the gradient's norm to this; 0: no clipping
    checkpoint_every_n_steps: int = 250  # steps between step-numbered checkpoints (last.ckpt is kept too)
    max_bad_steps: int = 0  # steps with a NaN/inf loss to skip (no update) before the run stops
    compile: bool = False  # torch.compile the model
    # trainer.strategy=fsdp only, what each GPU keeps a shard of: full_shard (weights, gradients, optimizer state),
    # shard_grad_op (gradients, optimizer state), hybrid_shard (full_shard in a node, replicas across), no_shard
    sharding: str = "full_shard"
    activation_checkpointing: bool = False  # trainer.strategy=fsdp only: each block's activations recomputed in backward
    peak_flops: Optional[float] = None  # for MFU; None: measured on CPU, looked up for known GPUs

    def __post_init__(self) -> None:
        # Everything Lightning's Trainer would refuse is refused here, naming its setting: run.py's one guard
        # around the Trainer can name only the devices.
        for name in ("max_steps", "val_check_interval", "log_every_n_steps", "checkpoint_every_n_steps", "num_nodes"):
            require(getattr(self, name) > 0, f"trainer.{name}", f"must be positive, got {getattr(self, name)}")
        if self.limit_val_batches is not None:
            require(_valid_batch_limit(self.limit_val_batches), "trainer.limit_val_batches",
                     f"must be a positive number of batches or a fraction in (0, 1], got {self.limit_val_batches!r}")
        require(math.isfinite(self.gradient_clip_val) and self.gradient_clip_val >= 0, "trainer.gradient_clip_val",
                 f"must be a finite number >= 0, got {self.gradient_clip_val}")
        require(self.max_bad_steps >= 0, "trainer.max_bad_steps", f"must be >= 0, got {self.max_bad_steps}")
        choice(self.accelerator, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
        if self.strategy != "auto":  # Lightning's registry only then: configs that keep auto need no Lightning import
            from lightning.pytorch.strategies import StrategyRegistry

            choice(self.strategy, "trainer.strategy", ["auto", *StrategyRegistry.available_strategies()])
        require(_valid_devices(self.devices, cpu=self.accelerator == "cpu"), "trainer.devices",
                 f"got {self.devices!r}, expected 'auto', a positive count" +
                 (f" (the CPU takes a count of processes, at most this machine's {os.cpu_count() or 1} cores)"
                  if self.accelerator == "cpu" else
                  ", -1 for all, or a list of device indices"))
        choice(self.precision, "trainer.precision",
                ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true"))
        if self.peak_flops is not None:
            positive(self.peak_flops, "trainer.peak_flops")
        choice(self.sharding, "trainer.sharding", SHARDINGS)
        if self.strategy != "fsdp":  # a knob that would change nothing is refused, not ignored
            for knob in ("sharding", "activation_checkpointing"):
                require(getattr(self, knob) == getattr(TrainerConfig, knob), f"trainer.{knob}",
                        f"applies to trainer.strategy=fsdp only (trainer=fsdp), not {self.strategy!r}")
        finite(self, "trainer")


SEED_MAX = 2**32 - 1  # Lightning's seed_everything seeds numpy, whose seeds are 32-bit


@dataclass
class RunConfig:
    """The whole training run, as Hydra composes it from conf/."""

    # The model group's settings; once built, the ModelConfig of those settings with rope and rope_scaling.
    model: ModelSettings = field(default_factory=ModelSettings)
    rope: Any = None  # the position encoding
    rope_scaling: Any = None  # the rotary frequency scaling that extends the context (PI, NTK, YaRN, ...)
    positions: Any = None  # how training positions are drawn (contiguous, PoSE, randomized)
    data: DataConfig = field(default_factory=DataConfig)  # the text or synthetic task trained on (conf/data)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # conf/tokenizer
    optim: OptimConfig = field(default_factory=OptimConfig)  # conf/optim
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # conf/trainer
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # where metrics go (conf/logger)
    seed: int = 0  # seeds the weights, the data order and the positions drawn; in [0, 2**32 − 1]
    ckpt_path: Optional[str] = None  # "last" resumes this run folder's last checkpoint; or a path
    # What to fine-tune: a run folder or .ckpt, hf:<folder or hub id>, or a .gguf file; its weights, shape, encoding
    # and tokenizer, with a fresh optimizer
    init_from: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)  # low-rank adapters instead of full fine-tuning (lora.rank=8)
    verbose: bool = False  # show the libraries' console lines too (devices, tips, deprecations)

    def __post_init__(self) -> None:
        require(0 <= self.seed <= SEED_MAX, "seed", f"must be in [0, {SEED_MAX}] (what numpy seeds), got {self.seed}")
        # The top-level rope / rope_scaling groups are the encoding's one slot; the model built here carries them.
        self.rope = RotaryConfig() if self.rope is None else position_config(self.rope)
        self.rope_scaling = scaling_config(self.rope_scaling)
        try:
            self.model = ModelConfig.of(self.model, self.rope, self.rope_scaling)
        except ValueError:
            if self.init_from is None or self.rope_scaling.from_factor:
                raise
            # Factors searched for one model (longrope) fit its source's shape, not the model group's:
            # minillm.train.finetune.from_source puts that shape in and checks them there.
            self.model = ModelConfig.of(self.model, self.rope, Scaling())
        self.positions = sampler_config(self.positions)
        self.lora.check_source(self.init_from)  # adapters need pretrained weights to adapt
        if self.data.synthetic:  # the task's prompt must fit the training windows (and its knobs agree)
            self.data.synthetic_task.check_length(self.model.context_length)
        if self.init_from is None:  # a fine-tuning is checked once its source's settings are in (minillm.train.finetune)
            self.sampler.check(self.rope, self.model.context_length)

    @property
    def sampler(self):
        """The position sampler with its reach resolved (PoSE's target: the scaling's extended length)."""
        return self.positions.resolved(self.model.context_length, self.rope_scaling)
