"""PoPE, polar coordinate position embedding: softplus magnitudes turned by position-only phases."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.positions.base import ModelShape, PositionConfig, PositionEncoding, Positions, register_position
from minillm.positions.scaling import Scaling, scaling_config
from minillm.registry import finite, positive, require

# Scalings whose formula does not carry over to PoPE's head_dim frequencies, and why.
REFUSED_SCALINGS = {
    "longrope": "its per-frequency factors are searched on a RoPE model's head_dim/2 pairs "
                "(eval/longrope_search needs one); PoPE turns head_dim frequencies",
}


@register_position("pope")
@dataclass
class PopeConfig(PositionConfig):
    """PoPE (Gopalakrishnan et al. 2025, arXiv:2509.10534; lucidrains/PoPE-pytorch `apply_pope_to_qk`,
    x-transformers `PolarEmbedding`).

    Each of the head_dim channels c of q and k becomes a complex number of magnitude softplus(x_c) and phase
    position·θ_c, θ_c = theta^(−c/d) over all d = head_dim channels (d frequencies, not d/2), plus a learned phase
    bias δ_{h,c} in [−2π, 0] on the keys:
        score(m, n) = Σ_c softplus(q_c) softplus(k_c) cos((m − n)·θ_c − δ_{h,c}) / √d.
    Content sets only magnitudes, position only phases. Frequency scalings apply to θ_c as to RoPE's (PoPE's θ_c
    are RoPE's frequencies over 2·head_dim channels; YaRN's temperature multiplies the magnitudes of q and k),
    all but those in REFUSED_SCALINGS.
    """

    variant: str = "pope"  # the registry name (rope=pope)
    theta: float = 10000.0  # the base: channel c turns at theta^(−c/head_dim) radians per position
    bias_uniform_init: bool = False  # δ drawn from U(−2π, 0) (the reference's option); False: zeros, its default

    rotary: ClassVar[bool] = True  # positions turn q and k (PoPE's widened ones), so scalings and ReRoPE apply
    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self.theta, "rope.theta")
        finite(self, "rope", PopeConfig)

    @property
    def label(self) -> str:
        return f"pope θ={self.theta:g}"

    def tags(self) -> list[str]:
        return [f"theta={self.theta:g}", f"bias_init={'uniform' if self.bias_uniform_init else 'zeros'}"]

    def rotary_spectrum(self, head_dim: int) -> tuple[int, float]:
        # The 2·head_dim channels of the widened q and k turn, in pairs, at theta^(−2i/(2·head_dim)).
        return 2 * head_dim, self.theta

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        require(scaling.name not in REFUSED_SCALINGS, "rope_scaling.type",
                f"{scaling.name!r} does not apply to rope=pope: {REFUSED_SCALINGS.get(scaling.name)}")
        scaling.check_dim(2 * shape.head_dim)
        if scaling.name != "none":
            scaling.check_length(scaling.original)

    def build(self, shape: ModelShape, scaling: Scaling) -> "PolarEmbedding":
        return PolarEmbedding(shape.head_dim, shape.n_heads, self.theta, scaling, self.bias_uniform_init)


@dataclass
class PolarRotation:
    """One forward's PoPE tables, built once from its positions and the phase bias, shared by every layer.

    query: cos, sin (batch or 1, heads, q_len, head_dim) of m·θ_c − δ_{h,c}, times √2·attention_factor;
    key: cos, sin (batch or 1, 1, k_len, head_dim) of n·θ_c, times attention_factor.
    """

    query: tuple[Tensor, Tensor]
    key: tuple[Tensor, Tensor]
    rotary_dim: int  # channels of the widened q and k that turn: 2·head_dim
    length: int

    def __call__(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q (batch, heads, q_len, d), k (batch, kv_heads, k_len, d) -> the same with 2·d channels each:
        (|x|·cos φ, |x|·sin φ) with |x| = softplus(x), so that q'·k' = Σ_c |q_c||k_c| cos(φ_q − φ_k)."""
        return _widen(q, *self.query), _widen(k, *self.key)


def _widen(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    magnitude = F.softplus(x.float())  # in float32 whatever the activations, as the reference does
    return torch.cat((magnitude * cos, magnitude * sin), dim=-1).to(x.dtype)


class PolarEmbedding(PositionEncoding):
    """PoPE's phases for queries and keys: θ_c = theta^(−c/d) (under the scaling), and one phase bias δ (heads, d)
    shared by every layer, as x-transformers shares its PolarEmbedding across an encoder's layers.

    The reference adds δ to the key phases; here −δ is added to the query phases, which gives the same scores
    (cos(φ_q − φ_k − δ)) and lets every query head of a grouped-query group keep its own δ, as in multi-head
    attention. Frequencies, like RotaryEmbedding's, are computed in float64 and are plain attributes, not buffers.
    """

    def __init__(self, head_dim: int, n_heads: int, theta: float = 10000.0, scaling: "Scaling | dict | None" = None,
                 bias_uniform_init: bool = False, phase_bias: Optional[nn.Parameter] = None):
        super().__init__()
        positive(theta, "theta")
        self.head_dim, self.n_heads, self.theta = head_dim, n_heads, float(theta)
        self.bias_uniform_init = bias_uniform_init
        self.scaling = scaling_config(scaling)
        require(not self.scaling.needs_original or self.scaling.original_max_position is not None,
                "scaling.original_max_position", f"{self.scaling.name} needs the trained length")
        # θ_c = theta^(−c/d), c < d: RoPE's frequencies over 2d channels, so every scaling formula reads them as is.
        self._inv_freq64, self.attention_factor = self.scaling.frequencies(
            self.theta, 2 * head_dim, self.scaling.original_max_position or 0)
        self.register_buffer("inv_freq", self._inv_freq64.float(), persistent=False)  # for reading
        if phase_bias is None:
            phase_bias = nn.Parameter(torch.zeros(n_heads, head_dim))
            if bias_uniform_init:
                nn.init.uniform_(phase_bias, -2 * math.pi, 0.0)
        self.phase_bias = phase_bias  # δ per query head and channel, clamped to [−2π, 0] where used

    def rescaled(self, scaling: Scaling) -> "PolarEmbedding":
        """The same encoding, its phase bias shared, under another scaling ("none": this one as built)."""
        if scaling.name == "none":
            return self
        require(scaling.name not in REFUSED_SCALINGS, "scaling",
                f"{scaling.name!r} does not apply to rope=pope: {REFUSED_SCALINGS.get(scaling.name)}")
        if self.scaling.original_max_position is not None:
            scaling = scaling.trained_at(self.scaling.original_max_position)
        return PolarEmbedding(self.head_dim, self.n_heads, self.theta, scaling, self.bias_uniform_init,
                              self.phase_bias).to(self.inv_freq.device)

    def _frequencies(self, length: int) -> tuple[Tensor, float]:
        if not self.scaling.dynamic:
            return self._inv_freq64, self.attention_factor
        return self.scaling.frequencies(self.theta, 2 * self.head_dim, length)

    def rotation(self, positions: Positions) -> PolarRotation:
        inv_freq, attention_factor = self._frequencies(positions.length)
        inv_freq = inv_freq.to(positions.query.device)

        def phases(where: Tensor) -> Tensor:
            # float64 products reduced mod 2π, then float32: a float32 product would lose the phase at long positions
            return (where.double()[..., None] * inv_freq).remainder(2 * math.pi).float()  # (P, seq, d)

        # The reference's clamp (PoPE-pytorch, x-transformers): δ stays within one turn below zero.
        bias = self.phase_bias.float().clamp(-2 * math.pi, 0.0)[None, :, None, :]  # (1, heads, 1, d)
        query = phases(positions.query)[:, None] - bias  # (P, heads, q_len, d)
        key = phases(positions.key)[:, None]  # (P, 1, k_len, d)
        # SDPA scales q'·k' by 1/√(2d), the width of the widened vectors; the reference scales by 1/√d (its
        # softmax_scale = head_dim^−0.5 of the unwidened q): √2 on the query tables makes SDPA's default the same.
        query_scale = math.sqrt(2.0) * attention_factor
        return PolarRotation((query.cos() * query_scale, query.sin() * query_scale),
                             (key.cos() * attention_factor, key.sin() * attention_factor),
                             2 * self.head_dim, positions.length)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, heads={self.n_heads}, theta={self.theta:g}, scaling={self.scaling.name}"
