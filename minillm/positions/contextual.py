"""Contextual positions counted from the attention scores: CoPE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from minillm.positions.base import ModelShape, PerLayer, PositionConfig, PositionEncoding, register_position
from minillm.positions.scaling import Scaling
from minillm.registry import require


@register_position("cope")
@dataclass
class CoPEConfig(PositionConfig):
    """CoPE (Golovneva et al. 2024, arXiv:2405.18719): positions counted by gates on the context, one table per layer.

    g_ij = σ(q_i·k_j/√d), p_ij = Σ_{t=j..i} g_it, and the logit of (i, j) gains q_i·e[p_ij] (interpolated between
    ⌊p⌋ and ⌈p⌉), e a head_dim × npos table shared by the heads of a layer; positions past npos − 1 are clamped.
    """

    variant: str = "cope"  # the registry name (rope=cope)
    npos: Optional[int] = None  # rows of each layer's table, counts clamped below it; None: training length + 1

    contextual: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = False  # it counts its own from the scores: given positions change nothing

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.npos is None or self.npos >= 2, "rope.npos", f"must be at least 2 (or null), got {self.npos}")

    def build(self, shape: ModelShape, scaling: Scaling) -> "PerLayer":
        # One per layer, as in the reference (facebookresearch/RAM, projects/cope).
        npos = self.npos if self.npos is not None else shape.context_length + 1
        return PerLayer(shape.positional_layers, lambda: ContextPosition(shape.head_dim, npos))


class ContextPosition(PositionEncoding):
    """The logits one layer's CoPE adds: (q_i·e[p_ij]) / √d, e initialised to zeros as in the reference."""

    contextual = True

    def __init__(self, head_dim: int, npos: int):
        super().__init__()
        self.npos, self.scale = npos, head_dim ** -0.5
        self.embedding = nn.Parameter(torch.zeros(head_dim, npos))

    def context_logits(self, q: Tensor, scores: Tensor) -> Tensor:
        """q (B, H, rows, head_dim) float32; scores (B, H, rows, keys) = q·kᵀ/√d, −inf at keys not seen
        (their gate is then 0, so a reverse cumulative sum over the row counts keys j..i)."""
        gates = torch.sigmoid(scores)
        positions = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.npos - 1)
        # NaN scores (from a row upstream that saw no key) would be an out-of-range index: read position 0.
        positions = positions.nan_to_num(0.0)
        fixed = q @ self.embedding.float()  # q·e[p] at every integer p: (B, H, rows, npos)
        floor = positions.floor()
        weight = positions - floor  # the gradient reaches the gates through this weight
        below, above = fixed.gather(-1, floor.long()), fixed.gather(-1, positions.ceil().long())
        return (above * weight + below * (1 - weight)) * self.scale
