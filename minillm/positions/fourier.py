"""FoPE, Fourier position embedding: each rotary pair a Fourier series of frequencies, the sub-critical ones zeroed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from minillm.positions.base import ModelShape, PositionConfig, PositionEncoding, Positions, register_position
from minillm.positions.rotary import rotate_half
from minillm.positions.scaling import Scaling, rotary_inv_freq, scaling_config
from minillm.registry import finite, positive, require

# Scalings whose formula does not carry over to FoPE, and why.
REFUSED_SCALINGS = {
    "longrope": "its per-frequency factors are searched on a RoPE model (eval/longrope_search needs one)",
}


def turning(theta: float, fourier_dim: int, length: int) -> Tensor:
    """bool (F/2,): which of the frequencies theta^(−2i/F), i < F/2, complete a turn within the training length
    L (θ ≥ 2π/L). The others are sub-critical: they never finish a period in training, so FoPE clamps them to 0."""
    return rotary_inv_freq(theta, fourier_dim) >= 2 * math.pi / length


def positional_pairs(n_frequencies: int, head_dim: int) -> int:
    """Pairs that carry a series: as many as frequencies, at most a quarter of the head's channels (the reference's
    output_dim = min(input_dim, head_dim // 4)); the other pairs carry no position."""
    return min(n_frequencies, head_dim // 4)


@register_position("fope")
@dataclass
class FopeConfig(PositionConfig):
    """FoPE (Hua et al. 2024, arXiv:2412.17739; TsinghuaC3I/Fourier-Position-Embedding `FourierEmbedding`).

    RoPE in the rotate_half pairing (i, i + d/2), pair j turned not by cos/sin(n·θ_j) but by Fourier series over
    the D frequencies ω_k = theta^(−2k/F) that complete a turn within the training length L (ω_k ≥ 2π/L):
        C_j(n) = Σ_k a_{h,k,j} cos(ω_k n),   S_j(n) = Σ_k b_{h,k,j} sin(ω_k n),   j < P = min(D, head_dim/4),
    and C_j = 1, S_j = 0 (frequency clamped to zero: no position) for the other pairs. The coefficients start at
    the identity (a_{h,k·s,k} = 1 with s = ⌈D/P⌉) plus N(0, σ²), σ = gain·√(2/(fan_in + fan_out)) as torch's
    xavier_normal_ counts the reference's tensor: (heads, D, P) per head, fan_in = D·P, fan_out = heads·P; (D, P)
    shared, fan_in = P, fan_out = D. The reference's defaults: per head, separate cos and sin coefficients, not
    trained. Scalings apply to the series' frequencies after the clamp (the reference's YaRN/PI "after"); their
    attention factor multiplies q and k. longrope is refused (REFUSED_SCALINGS). Omitted reference options:
    normalised coefficients, the other initialisations, keeping zero frequencies as inputs.
    """

    variant: str = "fope"  # the registry name (rope=fope)
    theta: float = 10000.0  # the base: frequency k of the series is theta^(−2k/fourier_dim)
    # F: the series draw on F/2 frequencies theta^(−2k/F) before the clamp; more than head_dim adds frequencies
    # between RoPE's; None: head_dim (the reference's fourier_dim = 0)
    fourier_dim: Optional[int] = None
    init_gain: float = 0.3  # the xavier gain of the coefficients' random part (fourier_init_norm_gain)
    learned: bool = False  # the coefficients are trained (fourier_learnable; off in the paper's runs)
    separate_heads: bool = True  # each head its own coefficients (fourier_separate_head); False: shared
    separate_basis: bool = True  # the cos and sin series their own coefficients (fourier_separate_basis)
    # frequencies slower than one turn in this many positions are zeroed; None: model.context_length. Set it to the
    # source's length to fine-tune at another one (the coefficients' shape follows which frequencies turn)
    clamp_length: Optional[int] = None

    rotary: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self.theta, "rope.theta")
        positive(self.init_gain, "rope.init_gain")
        if self.fourier_dim is not None:
            require(self.fourier_dim > 0 and self.fourier_dim % 2 == 0, "rope.fourier_dim",
                    f"must be a positive even number, got {self.fourier_dim}")
        if self.clamp_length is not None:
            require(self.clamp_length > 0, "rope.clamp_length", f"must be positive, got {self.clamp_length}")
        finite(self, "rope", FopeConfig)

    @property
    def label(self) -> str:
        extra = f" F={self.fourier_dim}" if self.fourier_dim else ""
        return f"fope θ={self.theta:g} gain={self.init_gain:g}{extra}"

    def tags(self) -> list[str]:
        return [f"theta={self.theta:g}", f"fope_gain={self.init_gain:g}", f"fope_learned={self.learned}"]

    def rotary_spectrum(self, head_dim: int) -> tuple[int, float]:
        return head_dim, self.theta  # the RoPE that FoPE starts from (its series' leading terms)

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        head_dim = shape.head_dim
        require(head_dim % 2 == 0 and head_dim >= 4, "model.d_model",
                f"FoPE needs an even head_dim of at least 4 (a quarter of it carries the series), got {head_dim}")
        require(self.fourier_dim is None or self.fourier_dim > head_dim, "rope.fourier_dim",
                f"adds frequencies to the head's {head_dim}: must exceed it, or be None, got {self.fourier_dim}")
        dim, length = self.fourier_dim or head_dim, self.clamp_length or shape.context_length
        require(bool(turning(self.theta, dim, length).any()),
                "rope.clamp_length" if self.clamp_length else "model.context_length",
                f"no frequency completes a turn within {length} positions (the fastest needs 2π)")
        require(scaling.name not in REFUSED_SCALINGS, "rope_scaling.type",
                f"{scaling.name!r} does not apply to rope=fope: {REFUSED_SCALINGS.get(scaling.name)}")
        scaling.check_dim(dim)
        if scaling.name != "none":
            scaling.check_length(scaling.original)

    def build(self, shape: ModelShape, scaling: Scaling) -> "FourierEmbedding":
        return FourierEmbedding(shape.head_dim, shape.n_heads, self.clamp_length or shape.context_length, self.theta,
                                self.fourier_dim, self.init_gain, self.learned, self.separate_heads,
                                self.separate_basis, scaling)


@dataclass
class FourierRotation:
    """One forward's FoPE tables, shared by every layer: C and S (batch or 1, heads or 1, seq, head_dim/2), the
    scaling's attention factor folded in, for the queries and for the keys (rotate_half pairing)."""

    query: tuple[Tensor, Tensor]
    key: tuple[Tensor, Tensor]
    rotary_dim: int  # channels that turn: the whole head
    length: int

    def __call__(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q (batch, heads, q_len, d), k (batch, kv_heads, k_len, d), turned in float32, rounded once to their dtype.

        Under grouped-query attention a key serves a group of query heads: it is turned by the table of the group's
        first head (the reference is multi-head only), each query head by its own."""
        key_cos, key_sin = self.key
        groups = q.shape[1] // k.shape[1]
        if key_cos.shape[1] > 1 and groups > 1:
            key_cos, key_sin = key_cos[:, ::groups], key_sin[:, ::groups]
        return (rotate_half(q.float(), *self.query).to(q.dtype), rotate_half(k.float(), key_cos, key_sin).to(k.dtype))


class FourierEmbedding(PositionEncoding):
    """FoPE's series for one model, shared by every layer (see FopeConfig for the formula).

    The coefficients are parameters when learned, else buffers saved with the checkpoint (they are random).
    """

    def __init__(self, head_dim: int, n_heads: int, clamp_length: int, theta: float = 10000.0,
                 fourier_dim: Optional[int] = None, init_gain: float = 0.3, learned: bool = False,
                 separate_heads: bool = True, separate_basis: bool = True, scaling: "Scaling | dict | None" = None,
                 coefficients: Optional[tuple[Tensor, Tensor]] = None):
        super().__init__()
        positive(theta, "theta")
        self.head_dim, self.n_heads, self.clamp_length, self.theta = head_dim, n_heads, clamp_length, float(theta)
        self.fourier_dim = fourier_dim or head_dim
        self.settings = dict(init_gain=init_gain, learned=learned, separate_heads=separate_heads,
                             separate_basis=separate_basis)
        self.scaling = scaling_config(scaling)
        require(not self.scaling.needs_original or self.scaling.original_max_position is not None,
                "scaling.original_max_position", f"{self.scaling.name} needs the trained length")
        self._kept = turning(self.theta, self.fourier_dim, clamp_length)  # the frequencies the clamp leaves
        n_frequencies = int(self._kept.sum())
        self.pairs = positional_pairs(n_frequencies, head_dim)
        require(self.pairs > 0, "clamp_length", f"no frequency completes a turn within {clamp_length} positions")
        self._frequencies64, self.attention_factor = self._series(self.scaling.original_max_position or 0)
        self.register_buffer("inv_freq", rotary_inv_freq(self.theta, head_dim).float(), persistent=False)
        self.register_buffer("frequencies", self._frequencies64.float(), persistent=False)  # for reading
        if coefficients is None:
            coefficients = self._initial_coefficients(n_frequencies, n_heads if separate_heads else 1, init_gain,
                                                      separate_basis)
        for name, value in zip(("cos_coef", "sin_coef"), coefficients):
            if learned:
                setattr(self, name, value if isinstance(value, nn.Parameter) else nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def _initial_coefficients(self, n_frequencies: int, heads: int, gain: float,
                              separate_basis: bool) -> tuple[Tensor, Tensor]:
        """(heads, D, P) each: the identity spread over the frequencies (step ⌈D/P⌉) plus N(0, σ²), σ from the
        reference's xavier fans (see FopeConfig). One tensor for both series unless separate_basis."""
        pairs = self.pairs
        fan_in, fan_out = (n_frequencies * pairs, heads * pairs) if self.settings["separate_heads"] else \
            (pairs, n_frequencies)
        sigma = gain * math.sqrt(2.0 / (fan_in + fan_out))
        step = math.ceil(n_frequencies / pairs)
        identity = torch.zeros(n_frequencies, pairs)
        for j in range(pairs):
            if j * step < n_frequencies:
                identity[j * step, j] = 1.0

        def draw() -> Tensor:
            return identity + sigma * torch.randn(heads, n_frequencies, pairs)

        cos_coef = draw()
        return (cos_coef, draw()) if separate_basis else (cos_coef, cos_coef)

    def _series(self, length: int) -> tuple[Tensor, float]:
        """The series' frequencies (float64, (D,)) and attention factor under the scaling at `length`: the scaling
        applies to the frequencies the clamp kept."""
        inv_freq, attention_factor = self.scaling.frequencies(self.theta, self.fourier_dim, length)
        return inv_freq[self._kept], attention_factor

    def rescaled(self, scaling: Scaling) -> "FourierEmbedding":
        """The same encoding, its coefficients shared, under another scaling ("none": this one as built)."""
        if scaling.name == "none":
            return self
        require(scaling.name not in REFUSED_SCALINGS, "scaling",
                f"{scaling.name!r} does not apply to rope=fope: {REFUSED_SCALINGS.get(scaling.name)}")
        if self.scaling.original_max_position is not None:
            scaling = scaling.trained_at(self.scaling.original_max_position)
        return FourierEmbedding(self.head_dim, self.n_heads, self.clamp_length, self.theta, self.fourier_dim,
                                scaling=scaling, coefficients=(self.cos_coef, self.sin_coef),
                                **self.settings).to(self.inv_freq.device)

    def _tables(self, where: Tensor, frequencies: Tensor, attention_factor: float) -> tuple[Tensor, Tensor]:
        """C and S (P, heads or 1, seq, head_dim/2) at positions `where` (P, seq)."""
        # float64 products reduced mod 2π, then float32: a float32 product would lose the angle at long positions
        angles = (where.double()[..., None] * frequencies).remainder(2 * math.pi).float()  # (P, seq, D)
        with torch.autocast(where.device.type, enabled=False):  # tables in float32, as the reference keeps them
            cos = angles.cos()[:, None] @ self.cos_coef.float()  # (P, 1, seq, D) @ (heads, D, pairs)
            sin = angles.sin()[:, None] @ self.sin_coef.float()
        rest = self.head_dim // 2 - self.pairs  # pairs at frequency zero: cos 1, sin 0
        cos = torch.cat((cos, cos.new_ones(*cos.shape[:-1], rest)), dim=-1)
        sin = torch.cat((sin, sin.new_zeros(*sin.shape[:-1], rest)), dim=-1)
        return cos * attention_factor, sin * attention_factor

    def rotation(self, positions: Positions) -> FourierRotation:
        frequencies, attention_factor = (self._series(positions.length) if self.scaling.dynamic
                                         else (self._frequencies64, self.attention_factor))
        frequencies = frequencies.to(positions.query.device)
        query = self._tables(positions.query, frequencies, attention_factor)
        key = query if positions.key is positions.query else self._tables(positions.key, frequencies, attention_factor)
        return FourierRotation(query, key, self.head_dim, positions.length)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, pairs={self.pairs}, frequencies={len(self._frequencies64)}, "
                f"theta={self.theta:g}, scaling={self.scaling.name}")
