"""LoRA fine-tuning settings (Hu et al. 2021, arXiv:2106.09685; LongLoRA's trainable norms and embeddings, arXiv:2309.12307)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from minillm.registry import positive, require

# Our Transformer's linear layers by role: the fused q|k|v projection, attention's output, the fused gate|up
# projection and the feed-forward's down projection.
LORA_TARGETS = ("qkv", "proj", "up", "down")


@dataclass
class LoraConfig:
    """Low-rank adapters on the chosen linear layers; None rank: full fine-tuning (the default)."""

    rank: Optional[int] = None  # the adapters' rank r; None: full fine-tuning, every weight trained
    alpha: Optional[float] = None  # the update is scaled by alpha / r; None: alpha = 2 r
    dropout: float = 0.0  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])  # layers that get adapters: qkv, proj, up, down
    train_norms: bool = False  # also train every RMSNorm's weight (LongLoRA's LoRA+)
    train_embeddings: bool = False  # also train the token embedding and output head (LongLoRA's LoRA+)

    def __post_init__(self) -> None:
        self.targets = [str(t) for t in self.targets]  # a plain list (Hydra hands over a ListConfig)
        if self.rank is not None:
            require(isinstance(self.rank, int) and self.rank > 0, "lora.rank", f"must be a positive integer, got {self.rank!r}")
        if self.alpha is not None:
            positive(self.alpha, "lora.alpha")
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
        return (2.0 * self.rank if self.alpha is None else self.alpha) / self.rank
