"""Stick-breaking attention: weights that break a stick from the nearest key outward, instead of a softmax."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.positions.base import ModelShape, PositionConfig, PositionEncoding, register_position
from minillm.positions.scaling import Scaling


@register_position("stickbreaking")
@dataclass
class StickBreakingConfig(PositionConfig):
    """Stick-breaking attention (Tan et al. 2024, arXiv:2410.17980): β_ij = σ(q_i·k_j/√d), and query i gives key
    j < i the weight A_ij = β_ij Π_{j<k<i} (1 − β_ik), what is left of the stick after the keys between them
    took their share; its own token gets the rest, A_ii = Π_{k<i} (1 − β_ik) = 1 − Σ_{j<i} A_ij. No position
    encoding: order comes from the breaking, nearest keys first (a recency bias counted from the scores).

    As shawntan/stickbreaking-attention's `sb_ref.py` with its default attend_current=False (keys before the
    query break the stick) and its tests' `o + rem · v` (the remainder on the query's own value). Computed in log
    space by blocks of queries, memory linear in the length: see StickBreaking.
    """

    variant: str = "stickbreaking"  # the registry name (rope=stickbreaking)

    contextual: ClassVar[bool] = True  # the weights are a function of every score of the row, not given positions
    reads_positions: ClassVar[bool] = False

    def build(self, shape: ModelShape, scaling: Scaling) -> "StickBreaking":
        return StickBreaking()


class StickBreaking(PositionEncoding):
    """The stick-breaking weights as logits over the scores of one block of queries (no parameters).

    log A_ij = log σ(z_ij) − Σ_{j<k<i} softplus(z_ik) for j < i (log(1 − σ(z)) = −softplus(z)), and
    log A_ii = −Σ_{k<i} softplus(z_ik): exact in log space, no 1 − Σ A cancellation. The sums over k run right to
    left (a reversed cumulative sum), so the keys nearest the query, which carry the weight, are summed first.
    Handed back as log A − z, which the layer adds to the scores z before its softmax (masks.contextual_attention);
    since the A of a row sum to 1, softmax(log A) = A.
    """

    contextual = True

    def context_logits(self, q: Tensor, scores: Tensor) -> Tensor:
        """q (B, H, rows, head_dim); scores (B, H, rows, keys) float32 = z = q·kᵀ/√d, −inf at keys not seen -> log A − z
        (finite), the logits whose softmax is A. A row's own token is the last key it sees (every causal pattern's
        diagonal). Since log σ(z) − z = −softplus(z), for j < i: log A_ij − z_ij = −Σ_{j≤k<i} softplus(z_ik)."""
        keys = scores.shape[-1]
        own = (keys - 1) - (scores > float("-inf")).flip(-1).byte().argmax(-1, keepdim=True)  # the last key seen
        breaks = F.softplus(scores).scatter_(-1, own, 0.0)  # −log(1 − β_ik) of the keys before the query; 0 unseen
        through = breaks.flip(-1).cumsum(-1).flip(-1)  # Σ_{k ≥ j}, right to left: the nearest keys summed first
        # The own token: log A_ii − z_ii = −Σ_{k<i} softplus(z_ik) − z_ii (z_ii clamped: a row that sees no key)
        own_logit = -through[..., :1] - scores.gather(-1, own).clamp(min=torch.finfo(scores.dtype).min)
        return through.neg_().scatter_(-1, own, own_logit)
