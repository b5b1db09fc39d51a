"""The training run's settings: optimizer, trainer, and the whole run as Hydra composes it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from minillm.data.config import DataConfig, TokenizerConfig
from minillm.model.config import ModelConfig, ModelSettings
from minillm.positions.base import position_config
from minillm.positions.rotary import RotaryConfig
from minillm.positions.samplers import sampler_config
from minillm.positions.scaling import scaling_config
from minillm.registry import choice, require
from minillm.tracking import LoggerConfig

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
        require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


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
            require(getattr(self, name) > 0, f"trainer.{name}", f"must be positive, got {getattr(self, name)}")
        require(self.gradient_clip_val >= 0, "trainer.gradient_clip_val", f"must be >= 0, got {self.gradient_clip_val}")
        require(self.max_bad_steps >= 0, "trainer.max_bad_steps", f"must be >= 0, got {self.max_bad_steps}")
        choice(self.accelerator, "trainer.accelerator", ("auto", "cpu", "gpu", "cuda", "mps", "tpu"))
        require(_valid_devices(self.devices, cpu=self.accelerator == "cpu"), "trainer.devices",
                 f"got {self.devices!r}, expected 'auto', a positive count" +
                 (f" (the CPU takes a count of processes, at most this machine's {os.cpu_count() or 1} cores)"
                  if self.accelerator == "cpu" else
                  ", -1 for all, or a list of device indices"))
        choice(self.precision, "trainer.precision",
                ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "64-true"))
        if self.peak_flops is not None:
            require(self.peak_flops > 0, "trainer.peak_flops", f"must be positive, got {self.peak_flops}")


@dataclass
class RunConfig:
    """The whole training run, as Hydra composes it from conf/."""

    # The model group's settings; once built, the ModelConfig of those settings with rope and rope_scaling.
    model: ModelSettings = field(default_factory=ModelSettings)
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
    # encoding and tokenizer are kept; the context length, scaling and positions are this run's (minillm.train.finetune).
    init_from: Optional[str] = None
    verbose: bool = False  # show the libraries' console lines too (devices, tips, deprecations)

    def __post_init__(self) -> None:
        # The top-level rope / rope_scaling groups are the encoding's one slot; the model built here carries them.
        self.rope = RotaryConfig() if self.rope is None else position_config(self.rope)
        self.rope_scaling = scaling_config(self.rope_scaling)
        self.model = ModelConfig.of(self.model, self.rope, self.rope_scaling)
        self.positions = sampler_config(self.positions)
        if self.data.synthetic:  # the task's prompt must fit the training windows (and its knobs agree)
            self.data.synthetic_task.check_length(self.model.context_length)
        if self.init_from is None:  # a fine-tuning is checked once its source's settings are in (minillm.train.finetune)
            self.sampler.check(self.rope, self.model.context_length)

    @property
    def sampler(self):
        """The position sampler with its reach resolved (PoSE's target: the scaling's extended length)."""
        return self.positions.resolved(self.model.context_length, self.rope_scaling)
