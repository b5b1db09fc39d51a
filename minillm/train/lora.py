"""LoRA fine-tuning: its settings, and the adapters peft puts on the model (Hu et al. 2021, arXiv:2106.09685;
LongLoRA's trainable norms and embeddings, arXiv:2309.12307)."""

from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn

from minillm.model.config import ModelConfig
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
    dropout: float = 0.0  # dropout on the adapters' input; not on qkv or a SwiGLU's up (read as one weight)
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
                              f"from random ones; name them with init_from=<run folder or checkpoint>, or drop "
                              f"lora.rank to train every weight")

    def check_model(self, model: ModelConfig) -> None:
        """ConfigError naming lora.dropout where a target is one the model multiplies by its weight in a fused
        kernel (FusedReadLinear): its update enters as a weight, where dropout on the input has no place."""
        fused = [t for t in self.targets if t in fused_targets(model)]
        if self.enabled and self.dropout > 0 and fused:
            others = [t for t in LORA_TARGETS if t not in fused]
            raise ConfigError(f"lora.dropout={self.dropout}: the adapters on {fused} enter the model's fused "
                              f"projection kernel as the weight W + (alpha/r)·B·A, where dropout on their input "
                              f"has no place; set lora.dropout=0, or target only {others}")

    def peft_config(self):
        """This config as peft's LoraConfig, its targets as a pattern over the Transformer's module names."""
        import peft

        paths = "|".join(re.escape(TARGET_PATHS[t]) for t in self.targets)
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                                 target_modules=rf"blocks\.\d+\.({paths})")
        config._register_custom_module({nn.Linear: fused_read_linear()})  # peft's documented (experimental) hook
        return config


def fused_targets(model: ModelConfig) -> tuple[str, ...]:
    """The targets minillm.model.transformer multiplies by their .weight (kernels.split_linear) instead of calling:
    the q|k|v projection, and gate|up in a SwiGLU."""
    return ("qkv", "up") if model.ffn == "swiglu" else ("qkv",)


@functools.cache
def fused_read_linear() -> type:
    """peft's LoRA Linear, built on first use (importing peft takes seconds), with .weight the adapted W + s·B·A.

    peft's own .weight is the frozen base weight, for code that reads a layer's weight to inspect it. Our model
    reads it to multiply: attention and SwiGLU call split_linear(x, qkv.weight, ...), one fused matmul returned in
    parts, and would skip the adapters silently. Here the layer's forward (for a layer the model calls) is
    peft's, x Wᵀ + s·B·A·dropout(x), and its .weight is the same map as a matrix; both read base_layer and the
    adapters where they lie, so merging, state_dict and peft's own methods see peft's layout."""
    from peft.tuners.lora import Linear

    class FusedReadLinear(Linear):
        @property
        def weight(self) -> Tensor:
            weight = self.get_base_layer().weight
            if self.disable_adapters or self.merged:
                return weight
            for name in self.active_adapters:
                if name in self.lora_A:  # W + (alpha / r)·B·A (Hu et al. 2021, arXiv:2106.09685, eq. 3 and sec. 4.1)
                    weight = weight + self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
            return weight

    return FusedReadLinear


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
