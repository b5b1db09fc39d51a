"""Position encodings: rotary layouts, XPos, non-rotary baselines; one config class and one module each, their registry.

Every encoding answers the same questions, so the transformer has no special cases:
    embed(x, positions)                  absolute encodings add to the token embeddings (identity otherwise)
    rotation(positions)                  rotary encodings build the tables that turn q and k (None otherwise)
    attention_bias(q_positions, k_positions)  ALiBi adds a bias to the attention scores (None otherwise)
    for_layer(layer)                     encodings with parameters of their own per layer (FIRE, CoPE) answer
                                         the questions above through that layer's part (themselves otherwise)
    context_logits(q, scores)            contextual encodings (CoPE) add logits computed from the scores
                                         themselves, which the attention then computes explicitly
The transformer computes the `Positions` of a forward once and hands them to its encoding; nothing here keeps
position state between calls. Adding an encoding means one config class registered with `@register_position`
(its fields, checks and `build`), its module, and one YAML in conf/rope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from minillm.kernels import rotate
from minillm.scaling import Scaling, known_fields, rotary_inv_freq, scaling_config


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


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


# ----------------------------------------------------------------------------------------------
# Positions: data computed once per forward by the transformer, never state of an encoding


@dataclass
class Positions:
    """The positions of one forward's queries and keys: LongTensors (batch or 1, q_len) and (batch or 1, k_len).

    length is one past the largest position, as a Python int (no device sync): the sequence length that
    dynamic scalings and XPos centre on. Keys may be the very tensor of the queries (no cache): then one
    set of tables serves both sides.
    """

    query: Tensor
    key: Tensor
    length: int

    @classmethod
    def contiguous(cls, start: int, q_len: int, device: torch.device) -> "Positions":
        """Queries at start .. start + q_len − 1 after a cache of `start` keys: keys at 0 .. start + q_len − 1."""
        query = torch.arange(start, start + q_len, device=device)[None]
        key = query if start == 0 else torch.arange(start + q_len, device=device)[None]
        return cls(query, key, start + q_len)

    @classmethod
    def of(cls, query: Tensor, key: Optional[Tensor] = None) -> "Positions":
        """Given positions (seq,) or (batch, seq); keys default to the queries' positions."""
        query = query if query.dim() == 2 else query[None]
        key = query if key is None else (key if key.dim() == 2 else key[None])
        if int(min(query.min(), key.min())) < 0:
            raise ValueError("positions: must be non-negative")
        return cls(query, key, int(max(query.max(), key.max())) + 1)


@dataclass(frozen=True)
class ModelShape:
    """The model dimensions an encoding may need (each encoding's config says which it reads)."""

    d_model: int
    n_heads: int
    head_dim: int
    context_length: int  # the training length
    init_std: float
    positional_layers: tuple[int, ...]  # the layers that see positions (all but model.nope_every's)


# ----------------------------------------------------------------------------------------------
# Configs and their registry: the registry name is the YAML's name in conf/rope and the `variant` field


POSITION_ENCODINGS: dict[str, type["PositionConfig"]] = {}


def register_position(*names: str):
    def add(cls: type[PositionConfig]) -> type[PositionConfig]:
        for name in names:
            POSITION_ENCODINGS[name] = cls
        return cls

    return add


@register_position("none")
@dataclass
class PositionConfig:
    """NoPE (Kazemnejad et al. 2023, arXiv:2305.19466): no position information, causal masking only."""

    variant: str = "none"

    rotary: ClassVar[bool] = False
    absolute: ClassVar[bool] = False  # positions added to the token embeddings, so no layer can do without them
    contextual: ClassVar[bool] = False  # positions counted from the attention scores (CoPE), not given

    def __post_init__(self) -> None:
        own = sorted(name for name, cls in POSITION_ENCODINGS.items() if cls is type(self))
        if self.variant not in own:
            hint = f"; {self.variant} is an encoding of its own: choose it with rope={self.variant}" \
                if self.variant in POSITION_ENCODINGS else ""
            raise ValueError(f"rope.variant: got {self.variant!r}, expected one of {own}{hint}")

    @property
    def is_rotary(self) -> bool:
        return self.rotary

    @property
    def label(self) -> str:
        """A short name for tables and plots."""
        return self.variant

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        """Raise, naming the setting, if this encoding cannot run on `shape` with `scaling`."""
        if scaling.name != "none":
            raise ValueError(f"rope_scaling.type: {scaling.name!r} scales rotary frequencies, but "
                             f"rope.variant={self.variant!r} is not rotary; use rope_scaling=none")

    def build(self, shape: ModelShape, scaling: Scaling) -> "PositionEncoding":
        return PositionEncoding()


def position_config(d: "dict | str | PositionConfig") -> PositionConfig:
    """Rebuild a position config from its plain dict (as stored in checkpoints), or a registry name."""
    if isinstance(d, PositionConfig):
        return d
    d = {"variant": d} if isinstance(d, str) else dict(d)
    variant = d.get("variant", RotaryConfig.variant)
    _require(variant in POSITION_ENCODINGS, "rope.variant", f"got {variant!r}, expected one of {sorted(POSITION_ENCODINGS)}")
    cls = POSITION_ENCODINGS[variant]
    return cls(**known_fields(cls, {**d, "variant": variant}, "rope"))


# ----------------------------------------------------------------------------------------------
# The encodings


class PositionEncoding(nn.Module):
    """No position information at all: every answer is the identity (NoPE)."""

    max_length: Optional[int] = None  # the longest sequence the encoding is defined for; None: any
    contextual: bool = False  # positions from the attention scores: the layer adds context_logits (CoPE)

    def for_layer(self, layer: int) -> "PositionEncoding":
        """The part of the encoding that layer `layer` (0-based) uses; the whole encoding when layers share it."""
        return self

    def embed(self, x: Tensor, positions: Positions) -> Tensor:
        return x

    def rotation(self, positions: Positions) -> Optional["Rotation"]:
        return None

    def attention_bias(self, query: Tensor, key: Tensor) -> Optional[Tensor]:
        """(batch or 1, heads, q_len, k_len) float32 scores added for queries and keys at these positions
        (causal masking is the attention's: positions need not be increasing)."""
        return None

    def rescaled(self, scaling: Scaling) -> "PositionEncoding":
        """This encoding with another frequency scaling; only rotary encodings have one."""
        if scaling.name == "none":
            return self
        raise ValueError(f"scaling: {scaling.name!r} needs a rotary model, this one uses {type(self).__name__}")


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
    theta: float = 10000.0
    rotary_dim: Optional[int] = None  # None: the whole head dimension
    xpos_scale_base: Optional[float] = None  # None: plain RoPE; a number turns XPos on

    rotary: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(math.isfinite(self.theta) and self.theta > 0, "rope.theta", f"must be positive, got {self.theta}")
        if self.rotary_dim is not None:
            _require(self.rotary_dim > 0 and self.rotary_dim % 2 == 0, "rope.rotary_dim",
                     f"must be a positive even number, got {self.rotary_dim}")
        if self.xpos_scale_base is not None:
            _require(self.xpos_scale_base > 0, "rope.xpos_scale_base", f"must be positive, got {self.xpos_scale_base}")

    @property
    def label(self) -> str:
        label = f"{self.variant} θ={self.theta:g}"
        if self.xpos_scale_base is not None:
            label = f"xpos({self.variant}) γ={self.xpos_scale_base:g}"
        return label + (f" r={self.rotary_dim}" if self.rotary_dim is not None else "")

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        _require(shape.head_dim % 2 == 0, "model.d_model",
                 f"rotary needs an even head_dim, got d_model/n_heads = {shape.head_dim}")
        _require(self.rotary_dim is None or self.rotary_dim <= shape.head_dim, "rope.rotary_dim",
                 f"{self.rotary_dim} exceeds head_dim={shape.head_dim}")
        scaling.check_dim(self.rotary_dim or shape.head_dim)
        scaling.check_length(scaling.original_max_position or shape.context_length)

    def build(self, shape: ModelShape, scaling: Scaling) -> "RotaryEmbedding":
        return RotaryEmbedding(shape.head_dim, self.variant, self.theta, self.rotary_dim, self.xpos_scale_base,
                               scaling.trained_at(shape.context_length))


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
        _require(variant in ROTARY_FUNCTIONS, "variant", f"got {variant!r}, expected one of {sorted(ROTARY_FUNCTIONS)}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        _require(not (head_dim % 2 or rotary_dim % 2) and 0 < rotary_dim <= head_dim, "rotary_dim",
                 f"need an even rotary_dim <= an even head_dim, got {rotary_dim} and {head_dim}")
        _require(theta > 0, "theta", f"must be positive, got {theta}")
        _require(xpos_scale_base is None or xpos_scale_base > 0, "xpos_scale_base",
                 f"must be positive, got {xpos_scale_base}")
        self.scaling = scaling_config(scaling)
        self.scaling.check_dim(rotary_dim)
        _require(not self.scaling.needs_original or self.scaling.original_max_position is not None,
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

    variant: str = "p_rope"
    p: float = 0.75
    layout: str = "rotate_half"  # pairing of the rotated channels: rotate_half (as Gemma), complex or interleaved

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0 < self.p <= 1, "rope.p", f"must be in (0, 1], got {self.p}")
        _require(self.layout in ROTARY_FUNCTIONS, "rope.layout",
                 f"got {self.layout!r}, expected one of {sorted(ROTARY_FUNCTIONS)}")
        _require(self.rotary_dim is None, "rope.rotary_dim", "p-RoPE rotates p·head_dim channels: set rope.p instead")

    @property
    def label(self) -> str:
        return f"p_rope p={self.p:g} θ={self.theta:g}"

    def rotated(self, head_dim: int) -> int:
        return round(self.p * head_dim)

    def validate(self, shape: ModelShape, scaling: Scaling) -> None:
        rotated = self.p * shape.head_dim
        _require(rotated == int(rotated) and int(rotated) % 2 == 0 and rotated > 0, "rope.p",
                 f"p·head_dim = {rotated:g} must be a positive even number of channels (head_dim {shape.head_dim})")
        super().validate(shape, scaling)
        scaling.check_dim(self.rotated(shape.head_dim))

    def build(self, shape: ModelShape, scaling: Scaling) -> "RotaryEmbedding":
        # r = p·d channels at theta'^(−2i/r) with theta' = theta^(r/d): exactly theta^(−2i/d) for i < r/2.
        r = self.rotated(shape.head_dim)
        return RotaryEmbedding(shape.head_dim, self.layout, self.theta ** (r / shape.head_dim), r, self.xpos_scale_base,
                               scaling.trained_at(shape.context_length))


@register_position("alibi")
@dataclass
class ALiBiConfig(PositionConfig):
    """ALiBi (Press et al. 2021, arXiv:2108.12409): a linear distance penalty per head on the scores."""

    variant: str = "alibi"

    def build(self, shape: ModelShape, scaling: Scaling) -> "ALiBi":
        return ALiBi(shape.n_heads)


class ALiBi(PositionEncoding):
    """score(m, n) += −slope_h · (m − n), no embedding at all."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_heads)), persistent=False)

    def attention_bias(self, query: Tensor, key: Tensor) -> Tensor:
        # float32 distances are exact below 2^24 positions
        distance = (query[..., :, None] - key[..., None, :]).float()  # (P, q, k)
        return distance[:, None] * -self.slopes.float()[:, None, None]  # (P, heads, q, k)


def alibi_slopes(n_heads: int) -> list[float]:
    """Geometric slopes 2^(−8/n), 2^(−16/n), ...; other head counts take the closest power of two and
    every other slope of the next one (the paper's reference code)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


@register_position("t5")
@dataclass
class T5Config(PositionConfig):
    """T5's relative bias (Raffel et al. 2020, arXiv:1910.10683): a learned scalar per (distance bucket, head),
    causal buckets as HF's `T5Attention._relative_position_bucket(bidirectional=False)`."""

    variant: str = "t5"
    num_buckets: int = 32
    max_distance: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.num_buckets >= 2, "rope.num_buckets", f"must be at least 2, got {self.num_buckets}")
        _require(self.max_distance > self.num_buckets // 2, "rope.max_distance",
                 f"must exceed num_buckets/2 = {self.num_buckets // 2} (the exact buckets), got {self.max_distance}")

    def build(self, shape: ModelShape, scaling: Scaling) -> "T5Bias":
        return T5Bias(shape.n_heads, self.num_buckets, self.max_distance, shape.init_std)


def t5_bucket(distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Causal T5 bucket of distance n = max(i − j, 0): n itself below num_buckets/2, then logarithmically
    spaced buckets up to max_distance, the last bucket beyond."""
    exact = num_buckets // 2
    n = distance.clamp(min=0)
    log_bucket = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    return torch.where(n < exact, n, log_bucket.clamp(max=num_buckets - 1))


class T5Bias(PositionEncoding):
    """score(i, j) += b[bucket(i − j), h], one table shared by every layer (as T5's first layer shares it)."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, init_std: float = 0.02):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.table = nn.Embedding(num_buckets, n_heads)
        nn.init.normal_(self.table.weight, std=init_std)

    def attention_bias(self, query: Tensor, key: Tensor) -> Tensor:
        buckets = t5_bucket(query[..., :, None] - key[..., None, :], self.num_buckets, self.max_distance)
        return self.table(buckets).permute(0, 3, 1, 2).float()  # (P, q, k, heads) -> (P, heads, q, k)


@register_position("kerple")
@dataclass
class KerpleConfig(PositionConfig):
    """KERPLE (Chi et al. 2022, arXiv:2205.09921): a conditionally positive definite kernel of the distance as
    the bias; log: −r₁·log(1 + r₂·|i − j|), power: −r₁·|i − j|^r₂, with r₁, r₂ > 0 learned per head."""

    variant: str = "kerple"
    kind: str = "log"  # log | power

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.kind in ("log", "power"), "rope.kind", f"got {self.kind!r}, expected 'log' or 'power'")

    @property
    def label(self) -> str:
        return f"kerple-{self.kind}"

    def build(self, shape: ModelShape, scaling: Scaling) -> "KerpleBias":
        return KerpleBias(shape.n_heads, self.kind)


class KerpleBias(PositionEncoding):
    """The kernel's parameters, shared by every layer as in chijames/KERPLE, initialised as there (r₁ ~ U(0, 2),
    r₂ ~ U(0, 1)) and kept positive by clamping at 0.01 in the forward (power: r₂ ≤ 2, the kernel's range)."""

    MIN = 0.01

    def __init__(self, n_heads: int, kind: str = "log"):
        super().__init__()
        self.kind = kind
        self.r1 = nn.Parameter(torch.rand(n_heads) * 2)
        self.r2 = nn.Parameter(torch.rand(n_heads))

    def attention_bias(self, query: Tensor, key: Tensor) -> Tensor:
        distance = (query[..., :, None] - key[..., None, :]).abs().float()[:, None]  # (P, 1, q, k)
        r1 = self.r1.float().clamp(min=self.MIN)[:, None, None]
        if self.kind == "log":
            return -r1 * torch.log1p(self.r2.float().clamp(min=self.MIN)[:, None, None] * distance)
        return -r1 * distance.pow(self.r2.float().clamp(self.MIN, 2.0)[:, None, None])


@register_position("fire")
@dataclass
class FireConfig(PositionConfig):
    """FIRE (Li et al. 2023, arXiv:2310.04418): a learned function of the progressively normalised distance,
    b(i, j) = f_θ(ψ(i − j) / ψ(max(L, i))), ψ(x) = log(c·x + 1), f_θ an MLP 1 → mlp_width → heads; one per layer."""

    variant: str = "fire"
    mlp_width: int = 32
    init_c: float = 0.1
    init_threshold: Optional[float] = None  # L before its learned multiplier; None: the training length

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.mlp_width >= 1, "rope.mlp_width", f"must be at least 1, got {self.mlp_width}")
        _require(self.init_c > 0, "rope.init_c", f"must be positive, got {self.init_c}")
        _require(self.init_threshold is None or self.init_threshold > 0, "rope.init_threshold",
                 f"must be positive (or null: the training length), got {self.init_threshold}")

    def build(self, shape: ModelShape, scaling: Scaling) -> "PerLayer":
        threshold = float(self.init_threshold if self.init_threshold is not None else shape.context_length)
        # One per layer, as in the reference (mcleish7/arithmetic, cramming/architectures/embeddings.py).
        return PerLayer(shape.positional_layers,
                        lambda: FireBias(shape.n_heads, self.mlp_width, self.init_c, threshold))


class PerLayer(PositionEncoding):
    """An encoding with parameters of its own in each layer that sees positions (FIRE, CoPE): one part per such
    layer, built by `make`; a position-free layer (model.nope_every) has none to leave untrained."""

    def __init__(self, layers: tuple[int, ...], make: Callable[[], PositionEncoding]):
        super().__init__()
        self.layers = nn.ModuleDict({str(layer): make() for layer in layers})

    def for_layer(self, layer: int) -> PositionEncoding:
        return self.layers[str(layer)]


class FireBias(PositionEncoding):
    """b(i, j) = MLP(log(|c·(i − j)| + 1) / (log(|c|·max(i, |λ·L|) + 1) + ε)) per head.

    The normaliser is the query's own position past the threshold L (learned through its multiplier λ): the
    farthest key is always at 1, so the MLP's input stays in [0, 1] at any length (the paper's "progressive
    interpolation"); below L it is a fixed ψ(L), and the bias depends on i − j only.
    """

    EPS = 1e-6
    HIDDEN_BUDGET = 2**22  # MLP hidden activations held at once, so long evaluations stay in bounded memory

    def __init__(self, n_heads: int, mlp_width: int = 32, init_c: float = 0.1, init_threshold: float = 512.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, mlp_width), nn.ReLU(), nn.Linear(mlp_width, n_heads))
        self.c = nn.Parameter(torch.tensor(float(init_c)))
        self.register_buffer("init_threshold", torch.tensor(float(init_threshold)))
        self.threshold_multiplier = nn.Parameter(torch.tensor(1.0))

    def normalised_distance(self, query: Tensor, key: Tensor) -> Tensor:
        """(P, q_len), (P, k_len) positions -> (P, q_len, k_len) MLP inputs, float32."""
        i, j = query.float()[..., :, None], key.float()[..., None, :]
        threshold = (self.threshold_multiplier * self.init_threshold).abs()
        c = self.c.float()
        normaliser = torch.log(torch.abs(c * torch.maximum(i, threshold)) + 1)
        return torch.log(torch.abs(c * (i - j)) + 1) / (normaliser + self.EPS)

    def attention_bias(self, query: Tensor, key: Tensor) -> Tensor:
        x = self.normalised_distance(query, key)
        rows = max(1, self.HIDDEN_BUDGET // (x.shape[0] * x.shape[-1] * self.mlp[0].out_features))
        bias = torch.cat([self.mlp(x[:, start:start + rows, :, None]) for start in range(0, x.shape[1], rows)], dim=1)
        return bias.float().permute(0, 3, 1, 2)  # (P, q, k, heads) -> (P, heads, q, k)


@register_position("cope")
@dataclass
class CoPEConfig(PositionConfig):
    """CoPE (Golovneva et al. 2024, arXiv:2405.18719): positions counted by gates on the context, one table per layer.

    g_ij = σ(q_i·k_j/√d), p_ij = Σ_{t=j..i} g_it, and the logit of (i, j) gains q_i·e[p_ij] (interpolated between
    ⌊p⌋ and ⌈p⌉), e a head_dim × npos table shared by the heads of a layer; positions past npos − 1 are clamped.
    """

    variant: str = "cope"
    npos: Optional[int] = None  # None: the training length + 1 (position 0 is possible), as the reference

    contextual: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.npos is None or self.npos >= 2, "rope.npos", f"must be at least 2 (or null), got {self.npos}")

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


@register_position("sinusoidal")
@dataclass
class SinusoidalConfig(PositionConfig):
    """Absolute sin/cos embedding added to the tokens (Vaswani et al. 2017, arXiv:1706.03762).

    The amplitude makes each channel's RMS equal the token embeddings' initial std, as a learned table
    starts. The paper balances the two by scaling tokens by √d instead; with std-0.02 tokens (and a tied
    head) a unit-amplitude table is ~35x the tokens and drowns them: on the extrapolation preset it trained
    to a validation loss of 6.0 against 3.9 for every other encoding.
    """

    variant: str = "sinusoidal"
    max_period: float = 10000.0

    absolute: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.max_period > 1, "rope.max_period", f"must be above 1, got {self.max_period}")

    def build(self, shape: ModelShape, scaling: Scaling) -> "SinusoidalEmbedding":
        return SinusoidalEmbedding(shape.d_model, self.max_period, amplitude=shape.init_std * math.sqrt(2))


class SinusoidalEmbedding(PositionEncoding):
    """amplitude·[cos(m·ω_i), sin(m·ω_i)], ω_i = max_period^(−i/(d/2)) (the timestep-embedding layout);
    defined at every position."""

    def __init__(self, d_model: int, max_period: float = 10000.0, amplitude: float = 1.0):
        super().__init__()
        half = d_model // 2
        self.d_model, self.amplitude = d_model, amplitude
        self._freqs64 = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)

    def embed(self, x: Tensor, positions: Positions) -> Tensor:
        args = positions.query.double()[..., None] * self._freqs64.to(x.device)  # (P, seq, d/2)
        table = (torch.cat((args.cos(), args.sin()), dim=-1) * self.amplitude).float()
        if table.shape[-1] < self.d_model:  # odd d_model: one zero channel
            table = torch.nn.functional.pad(table, (0, 1))
        return x + table.to(x.dtype)


@register_position("learned")
@dataclass
class LearnedConfig(PositionConfig):
    """Learned absolute positions (GPT-2): one trained vector per position up to the training length."""

    variant: str = "learned"

    absolute: ClassVar[bool] = True

    def build(self, shape: ModelShape, scaling: Scaling) -> "LearnedEmbedding":
        return LearnedEmbedding(shape.context_length, shape.d_model, shape.init_std)


class LearnedEmbedding(PositionEncoding):
    """A table of max_positions trained vectors, added to the tokens; undefined past its last row."""

    def __init__(self, max_positions: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.table = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.table.weight, std=init_std)
        self.max_length = max_positions

    def embed(self, x: Tensor, positions: Positions) -> Tensor:
        if positions.length > self.max_length:
            raise ValueError(f"learned positions cover 0..{self.max_length - 1} (the training length); "
                             f"asked for position {positions.length - 1}")
        return x + self.table(positions.query)


# ----------------------------------------------------------------------------------------------
# Multi-axis rotary (FLUX's EmbedND): each position has several coordinates (e.g. time, row, column)
# and axis a rotates its own axes_dims[a] channels in interleaved pairs.


class MultiAxisRotary(nn.Module):
    """Rotary over positions (batch, seq, n_axes); with one axis it is the interleaved RotaryEmbedding."""

    def __init__(self, axes_dims: list[int], theta: float = 10000.0):
        super().__init__()
        if not axes_dims or any(d <= 0 or d % 2 for d in axes_dims):
            raise ValueError(f"axes_dims: need positive even sizes, got {axes_dims}")
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
