"""LoRA fine-tuning: its settings, and the adapters peft puts on the model (Hu et al. 2021, arXiv:2106.09685;
LongLoRA's trainable norms and embeddings, arXiv:2309.12307)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from minillm.model.transformer import RMSNorm
from minillm.registry import ConfigError, positive, require

log = logging.getLogger("minillm")

# Our Transformer's linear layers by role, and where each lies in a block: the fused q|k|v projection, attention's
# output, the fused gate|up projection and the feed-forward's down projection.
TARGET_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "up": "ffn.up", "down": "ffn.down"}
LORA_TARGETS = tuple(TARGET_PATHS)
NORMS = (RMSNorm, nn.LayerNorm)  # every norm of the Transformer, QK-norm included


@dataclass
class LoraConfig:
    """Low-rank adapters on the chosen linear layers; None rank: full fine-tuning (the default)."""

    rank: Optional[int] = None  # the adapters' rank r; None: full fine-tuning, every weight trained
    alpha: Optional[float] = None  # the update is scaled by alpha / r; None: alpha = 2 r (recorded as the number)
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # layers that get adapters: qkv, proj, up, down
    train_norms: bool = False  # also train every norm's weight (LongLoRA's LoRA+)
    train_embeddings: bool = False  # also train the token embedding and output head (LongLoRA's LoRA+)

    def __post_init__(self) -> None:
        self.targets = [str(t) for t in self.targets]  # a plain list (Hydra hands over a ListConfig)
        if self.rank is not None:
            require(isinstance(self.rank, int) and self.rank > 0, "lora.rank",
                    f"must be a positive integer, got {self.rank!r}")
        if self.alpha is not None:
            positive(self.alpha, "lora.alpha")
        elif self.rank is not None:  # the run's record (and a checkpoint's merge) then holds the factor used
            self.alpha = 2.0 * self.rank
        require(math.isfinite(self.dropout) and 0 <= self.dropout < 1, "lora.dropout",
                f"must be in [0, 1), got {self.dropout}")
        require(len(self.targets) > 0, "lora.targets", f"name at least one of {list(LORA_TARGETS)}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        require(not unknown, "lora.targets", f"got {unknown}, expected names among {list(LORA_TARGETS)}")

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @property
    def scale(self) -> float:
        """alpha / r: the factor on B·A in W + (alpha / r)·B·A."""
        return self.alpha / self.rank

    def check_source(self, init_from: Optional[str]) -> None:
        """ConfigError naming lora.rank for adapters without pretrained weights: on a random frozen model they
        learn a low-rank patch to noise."""
        if self.enabled and init_from is None:
            raise ConfigError(f"lora.rank={self.rank}: adapters fine-tune pretrained weights, and this run starts "
                              f"from random ones; name them with init_from=<run folder, checkpoint, hf:<folder> or "
                              f".gguf>, or drop lora.rank to train every weight")

    def peft_config(self):
        """This config as peft's LoraConfig, its targets as a pattern over the Transformer's module names."""
        import peft

        paths = "|".join(re.escape(TARGET_PATHS[t]) for t in self.targets)
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                                 target_modules=rf"blocks\.\d+\.({paths})")
        return config


def has_adapters(model: nn.Module) -> bool:
    return any(name.endswith("lora_A") for name, _ in model.named_modules())


def apply_adapters(model: nn.Module, cfg: LoraConfig) -> None:
    """Put cfg's adapters on `model` (a Transformer) in place and freeze everything else but the norms and the
    embedding and head where cfg trains them. A model that has them already is left as it is (Lightning may call
    configure_model more than once)."""
    if has_adapters(model):
        return
    try:
        import peft
    except ImportError as error:
        raise ConfigError(f"lora.rank: needs the peft package ({error}); install it with pip install "
                          f"'minillm[real]'") from error

    # peft freezes every weight but the adapters' A and B: biases, learned position tables and ssmax's factors too.
    peft.inject_adapter_in_model(cfg.peft_config(), model)
    trained = [p for m in model.modules() if cfg.train_norms and isinstance(m, NORMS) for p in m.parameters()]
    if cfg.train_embeddings:
        trained += [model.embed.weight, model.head.weight]  # the same tensor when tied
    for param in trained:
        param.requires_grad_(True)
    trainable, total = parameter_counts(model)
    log.info("LoRA rank %d on %s: training %d of %d parameters (%.2f%%)", cfg.rank, ",".join(cfg.targets),
             trainable, total, 100 * trainable / total)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a tied tensor counted once (Module.parameters yields it once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
