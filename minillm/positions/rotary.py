"""Rotary encodings: the three layouts, XPos, p-RoPE, the per-forward Rotation, multi-axis rotary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from minillm.kernels import rotate
from minillm.positions.base import ModelShape, PositionConfig, PositionEncoding, Positions, register_position
from minillm.positions.scaling import Scaling, rotary_inv_freq, scaling_config
from minillm.registry import finite, positive, require

# ----------------------------------------------------------------------------------------------
# Rotary layouts: the same rotation by angle m*θ_i applied to three different pairings of channels.
# Each takes x (..., seq, rotary_dim) in float32 and cos, sin (..., seq, rotary_dim // 2). These are the
# reference formulas: the tests compare against them, and minillm.kernels applies the same rotations fused.


def rotate_complex(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """LLaMA: adjacent pairs (x[2i], x[2i+1]) viewed as complex numbers, multiplied by e^(i·m·θ_i)."""
    rotation = torch.complex(cos, sin)  # cos and sin may carry XPos or YaRN magnitudes: r·e^(iφ)
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotation).flatten(-2)


def rotate_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J / FLUX: the same adjacent pairs (x[2i], x[2i+1]) rotated with real cos/sin tables."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-NeoX / HF LLaMA: pairs (x[i], x[i + d/2]); equals x·cos + rotate_half(x)·sin with duplicated tables."""
    x_low, x_high = x.chunk(2, dim=-1)
    return torch.cat((x_low * cos - x_high * sin, x_high * cos + x_low * sin), dim=-1)


ROTARY_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "complex": rotate_complex,
    "interleaved": rotate_interleaved,
    "rotate_half": rotate_half,
}
ROTARY_LAYOUTS = tuple(ROTARY_FUNCTIONS)


# ----------------------------------------------------------------------------------------------
# XPos (Sun et al. 2022, arXiv:2212.10554): q_m scaled by ζ^(m/γ), k_n by ζ^(−n/γ), so q·k carries
# ζ^((m−n)/γ) and decays with distance. ζ_i = (2i/d + 0.4)/1.4 < 1 for every i.

XPOS_HEADROOM = 2.0**8  # activations up to this magnitude times the largest XPos factor stay finite


def xpos_max_length(scale_base: float, dtype: torch.dtype) -> int:
    """Longest sequence whose XPos factors stay finite in `dtype`.

    The smallest ζ is 0.4/1.4 = 2/7. Queries and keys are scaled around the sequence's centre, but the
    score of a query with a later key (computed before the causal mask drops it) carries (7/2)^((L−1)/γ);
    that factor, times XPOS_HEADROOM for the activations, must stay below the dtype's maximum.
    float16: 2267 positions at γ = 512; bfloat16: 33993; float32: 33995.
    """
    budget = math.log(torch.finfo(dtype).max) - math.log(XPOS_HEADROOM)
    return int(scale_base * budget / math.log(3.5)) + 1


@dataclass
class Rotation:
    """One forward's rotary tables, built once from its positions and shared by every layer.

    cos, sin: float32 (batch or 1, 1, seq, rotary_dim // 2), the attention factor and XPos magnitudes
    folded in; q_len rows for the queries, k_len for the keys.
    """

    query: tuple[Tensor, Tensor]
    key: tuple[Tensor, Tensor]
    rotary_dim: int
    adjacent: bool  # pairs (2i, 2i+1) (complex, interleaved); otherwise (i, i + d/2) (rotate_half)
    length: int
    xpos_scale_base: Optional[float] = None

    def __call__(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q (batch, heads, q_len, head_dim) and k (batch, kv_heads, k_len, head_dim)."""
        limit = None if self.xpos_scale_base is None else xpos_max_length(self.xpos_scale_base, q.dtype)
        if limit is not None and self.length > limit:
            raise ValueError(f"xpos_scale_base: XPos factors overflow {q.dtype} past {limit} positions (asked for "
                             f"{self.length}); use a wider dtype or a larger xpos_scale_base")
        formula = rotate_interleaved if self.adjacent else rotate_half  # the real-valued form of the pairing
        return (rotate(q, *self.query, self.rotary_dim, self.adjacent, formula),
                rotate(k, *self.key, self.rotary_dim, self.adjacent, formula))


@register_position(*ROTARY_LAYOUTS)
@dataclass
class RotaryConfig(PositionConfig):
    """Rotary position embedding (Su et al. 2021, arXiv:2104.09864), optionally with XPos."""

    variant: str = "complex"  # the layout: complex | interleaved (pairs 2i, 2i+1) | rotate_half (pairs i, i+d/2)
    theta: float = 10000.0  # the base: pair i turns at theta^(−2i/rotary_dim) radians per position
    rotary_dim: Optional[int] = None  # channels per head that rotate (the rest see no position); None: all
    xpos_scale_base: Optional[float] = None  # XPos's γ: scores decay as ζ^(distance/γ); None: plain RoPE

    rotary: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self.theta, "rope.theta")
        if self.rotary_dim is not None:
            require(self.rotary_dim > 0 and self.rotary_dim % 2 == 0, "rope.rotary_dim",
                     f"must be a positive even number, got {self.rotary_dim}")
        if self.xpos_scale_base is not None:  # inf: no decay, and no length it can be run to (xpos_max_length)
            positive(self.xpos_scale_base, "rope.xpos_scale_base")
        finite(self, "rope", RotaryConfig)

    @property
    def label(self) -> str:
        label = f"{self.variant} θ={self.theta:g}"
        if self.xpos_scale_base is not None:
            label = f"xpos({self.variant}) γ={self.xpos_scale_base:g}"
        return label + (f" r={self.rotary_dim}" if self.rotary_dim is not None else "")

    def tags(self) -> list[str]:
        return [f"theta={self.theta:g}", f"xpos={self.xpos_scale_base or 'off'}"]

    def rotary_spectrum(self, head_dim: int) -> tuple[int, float]:
        return self.rotary_dim or head_dim, self.theta

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        require(shape.head_dim % 2 == 0, "model.d_model",
                 f"rotary needs an even head_dim, got d_model/n_heads = {shape.head_dim}")
        require(self.rotary_dim is None or self.rotary_dim <= shape.head_dim, "rope.rotary_dim",
                 f"{self.rotary_dim} exceeds head_dim={shape.head_dim}")
        scaling.check_dim(self.rotary_dim or shape.head_dim)
        if scaling.name != "none":  # its trained length is resolved (ModelConfig: the model's unless given)
            scaling.check_length(scaling.original)

    def build(self, shape: ModelShape, scaling: Scaling) -> "RotaryEmbedding":
        return RotaryEmbedding(shape.head_dim, self.variant, self.theta, self.rotary_dim, self.xpos_scale_base, scaling)


class RotaryEmbedding(PositionEncoding):
    """Rotary position embedding in one of three layouts, with optional XPos and frequency scaling.

    Angles are built in float64 from integer positions and cast to float32 tables, whatever the
    activation dtype: bf16 cannot tell position 2048 from 2049.

    `inv_freq` and `attention_factor` are the frequencies and factor at the training length; a dynamic
    scaling (dynamic NTK or YaRN, LongRoPE) changes both with the length: `inv_freq_at(length)`.
    """

    def __init__(self, head_dim: int, variant: str = "complex", theta: float = 10000.0,
                 rotary_dim: Optional[int] = None, xpos_scale_base: Optional[float] = None,
                 scaling: "Scaling | dict | None" = None):
        super().__init__()
        require(variant in ROTARY_FUNCTIONS, "variant", f"got {variant!r}, expected one of {sorted(ROTARY_FUNCTIONS)}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        require(not (head_dim % 2 or rotary_dim % 2) and 0 < rotary_dim <= head_dim, "rotary_dim",
                 f"need an even rotary_dim <= an even head_dim, got {rotary_dim} and {head_dim}")
        positive(theta, "theta")
        if xpos_scale_base is not None:
            positive(xpos_scale_base, "xpos_scale_base")
        self.scaling = scaling_config(scaling)
        self.scaling.check_dim(rotary_dim)
        require(not self.scaling.needs_original or self.scaling.original_max_position is not None,
                 "scaling.original_max_position", f"{self.scaling.name} needs the trained length")
        self.variant, self.theta, self.head_dim, self.rotary_dim = variant, float(theta), head_dim, rotary_dim
        self.xpos_scale_base = xpos_scale_base
        self.adjacent = variant in ("complex", "interleaved")
        # Plain attributes, not buffers: module.to(bfloat16) would round them and skew every angle. Both at the
        # training length (0 when the scaling has none: only formulas that need no length run without one).
        self._inv_freq64, self.attention_factor = self.scaling.frequencies(
            self.theta, rotary_dim, self.scaling.original_max_position or 0)
        # For reading, not computing: the frequencies at the training length (at length L: inv_freq_at(L)).
        self.register_buffer("inv_freq", self._inv_freq64.float(), persistent=False)
        if xpos_scale_base is not None:
            self._log_zeta = ((torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim + 0.4) / 1.4).log()

    def rescaled(self, scaling: Scaling) -> "RotaryEmbedding":
        """The same rotary encoding with another scaling (trained length: this one's, else the scaling's own);
        "none" keeps this encoding as built (its training-time scaling, if it had one)."""
        if scaling.name == "none":
            return self
        if self.scaling.original_max_position is not None:
            scaling = scaling.trained_at(self.scaling.original_max_position)
        return RotaryEmbedding(self.head_dim, self.variant, self.theta, self.rotary_dim, self.xpos_scale_base,
                               scaling).to(self.inv_freq.device)

    def _frequencies(self, length: int) -> tuple[Tensor, float]:
        """(inv_freq float64, attention_factor) for a sequence of `length` positions."""
        if not self.scaling.dynamic:
            return self._inv_freq64, self.attention_factor
        return self.scaling.frequencies(self.theta, self.rotary_dim, length)

    def inv_freq_at(self, length: int) -> Tensor:
        """The frequencies (float32, (rotary_dim/2,)) a sequence of `length` positions is rotated with:
        `inv_freq` unless the scaling is dynamic."""
        return self._frequencies(length)[0].float().to(self.inv_freq.device)

    def _side(self, positions: Tensor, inv_freq: Tensor, attention_factor: float, centre: int,
              sign: float) -> tuple[Tensor, Tensor]:
        """cos and sin (P, 1, seq, r/2) of one side; XPos scales by ζ^(±(m − c)/γ), centred on the sequence
        so that both signs stay within range."""
        angles = positions.double()[..., None] * inv_freq  # (P, seq, r/2), exact for positions below 2^53
        magnitude = torch.full_like(angles[..., :1], attention_factor)
        if self.xpos_scale_base is not None:
            exponent = (positions.double()[..., None] - centre) * (sign / self.xpos_scale_base)
            magnitude = magnitude * torch.exp(exponent * self._log_zeta.to(positions.device))
        return ((angles.cos() * magnitude).float().unsqueeze(1), (angles.sin() * magnitude).float().unsqueeze(1))

    def rotation(self, positions: Positions) -> Rotation:
        length = positions.length
        inv_freq, attention_factor = self._frequencies(length)  # dynamic YaRN's factor follows the length too
        inv_freq, centre = inv_freq.to(positions.query.device), length // 2
        query = self._side(positions.query, inv_freq, attention_factor, centre, 1.0)
        shared = positions.key is positions.query and self.xpos_scale_base is None
        key = query if shared else self._side(positions.key, inv_freq, attention_factor, centre, -1.0)
        return Rotation(query, key, self.rotary_dim, self.adjacent, length, self.xpos_scale_base)

    def forward(self, q: Tensor, k: Tensor, positions: Optional[Tensor] = None, offset: int = 0,
                key_positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Rotate q (batch, heads, q_len, head_dim) and k (batch, kv_heads, k_len, head_dim) on their own.

        positions: LongTensor (q_len,) or (batch, q_len); default offset .. offset + q_len − 1.
        Keys sit at key_positions; by default they end where the queries end (the KV-cache layout).
        """
        q_len, k_len = q.shape[-2], k.shape[-2]
        if positions is None and key_positions is None:
            if offset + q_len < k_len:
                raise ValueError(f"offset: {k_len} keys cannot end at position {offset + q_len - 1}")
            where = Positions.contiguous(offset, q_len, q.device)
            if k_len < where.key.shape[-1]:  # fewer keys than the cache layout: the last k_len of them
                where = Positions(where.query, where.key[:, -k_len:], where.length)
        else:
            q_pos = positions if positions is not None else torch.arange(offset, offset + q_len, device=q.device)
            where = Positions.of(q_pos, key_positions)
            if where.key.shape[-1] != k_len:
                raise ValueError(f"key_positions: {where.key.shape[-1]} positions for {k_len} keys")
        return self.rotation(where)(q, k)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, theta={self.theta:g}, rotary_dim={self.rotary_dim}, "
                f"xpos_scale_base={self.xpos_scale_base}, scaling={self.scaling.name}")


@register_position("p_rope")
@dataclass
class PRopeConfig(RotaryConfig):
    """p-RoPE (Barbero et al. 2024, arXiv:2410.06205): only the fraction p of the highest rotary frequencies
    θ_i = theta^(−2i/d), i < p·d/2, turn; the other channels rotate by 0 and carry no position (NoPE channels).
    HF's `proportional` RoPE type is the same rotation, so the model exports to it."""

    variant: str = "p_rope"  # the registry name (rope=p_rope)
    p: float = 0.75  # the fraction of the head's channels that turn, in (0, 1]
    layout: str = "rotate_half"  # pairing of the rotated channels: rotate_half (as Gemma), complex or interleaved

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 < self.p <= 1, "rope.p", f"must be in (0, 1], got {self.p}")
        require(self.layout in ROTARY_FUNCTIONS, "rope.layout",
                 f"got {self.layout!r}, expected one of {sorted(ROTARY_FUNCTIONS)}")
        require(self.rotary_dim is None, "rope.rotary_dim", "p-RoPE rotates p·head_dim channels: set rope.p instead")
        finite(self, "rope", PRopeConfig)

    @property
    def label(self) -> str:
        return f"p_rope p={self.p:g} θ={self.theta:g}"

    def rotated(self, head_dim: int) -> int:
        return round(self.p * head_dim)

    def rotary_spectrum(self, head_dim: int) -> tuple[int, float]:
        # The r = p·head_dim channels that turn, as built: theta'^(−2i/r) with theta' = theta^(r/d).
        r = self.rotated(head_dim)
        return r, self.theta ** (r / head_dim)

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        rotated = self.p * shape.head_dim
        require(rotated == int(rotated) and int(rotated) % 2 == 0 and rotated > 0, "rope.p",
                 f"p·head_dim = {rotated:g} must be a positive even number of channels (head_dim {shape.head_dim})")
        super().validate(shape, scaling)
        scaling.check_dim(self.rotated(shape.head_dim))

    def build(self, shape: ModelShape, scaling: Scaling) -> "RotaryEmbedding":
        # r = p·d channels at theta'^(−2i/r) with theta' = theta^(r/d): exactly theta^(−2i/d) for i < r/2.
        r = self.rotated(shape.head_dim)
        return RotaryEmbedding(shape.head_dim, self.layout, self.theta ** (r / shape.head_dim), r, self.xpos_scale_base,
                               scaling)


# ----------------------------------------------------------------------------------------------
# Multi-axis rotary (FLUX's EmbedND): each position has several coordinates (e.g. time, row, column)
# and axis a rotates its own axes_dims[a] channels in interleaved pairs.


class MultiAxisRotary(nn.Module):
    """Rotary over positions (batch, seq, n_axes); with one axis it is the interleaved RotaryEmbedding."""

    def __init__(self, axes_dims: list[int], theta: float = 10000.0):
        super().__init__()
        if not axes_dims or any(d <= 0 or d % 2 for d in axes_dims):
            raise ValueError(f"axes_dims: need positive even sizes, got {axes_dims}")
        positive(theta, "theta")
        self.axes_dims, self.theta, self.rotary_dim = list(axes_dims), float(theta), sum(axes_dims)
        self._inv_freqs = [rotary_inv_freq(theta, d) for d in axes_dims]

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if positions.dim() != 3 or positions.shape[-1] != len(self.axes_dims):
            raise ValueError(f"positions: need (batch, seq, {len(self.axes_dims)}), got {tuple(positions.shape)}")
        angles = torch.cat([positions[..., a, None].double() * inv_freq.to(positions.device)
                            for a, inv_freq in enumerate(self._inv_freqs)], dim=-1)
        cos, sin = angles.cos().float().unsqueeze(1), angles.sin().float().unsqueeze(1)
        r = self.rotary_dim

        def apply(x: Tensor) -> Tensor:
            rotated = rotate_interleaved(x[..., :r].float(), cos, sin).to(x.dtype)
            return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)

        return apply(q), apply(k)
