"""Position encodings: rotary layouts, XPos, frequency scalings, non-rotary baselines, their registries.

Every encoding answers the same three questions, so the transformer has no special cases:
    embed(x, offset)                  absolute encodings add to the token embeddings (identity otherwise)
    rotate(q, k, offset)              rotary encodings turn queries and keys (identity otherwise)
    attention_bias(queries, k_len, ...) ALiBi adds a bias to the attention scores (None otherwise)
Adding an encoding means one class registered here with `@register_position` and one YAML in conf/rope.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from minillm.kernels import rotate_half_fused, rotate_pairs, rotate_triton, triton_applies

if TYPE_CHECKING:  # rope.py stays importable without the config module (the config imports the names below)
    from minillm.config import ModelConfig


# ----------------------------------------------------------------------------------------------
# Rotary layouts: the same rotation by angle m*θ_i applied to three different pairings of channels.
# Each takes x (..., seq, rotary_dim) in float32 and cos, sin (..., seq, rotary_dim // 2).
# These are the reference formulas: the tests compare against them, torch.compile fuses them into one
# kernel per tensor, and eager RotaryEmbedding applies the same rotations with minillm.kernels' fused passes.


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
# Frequency scalings. Same contract as HF transformers' modeling_rope_utils: each returns
# (inv_freq, attention_factor); computed in float64 so the tables built from them are exact in float32.


def rotary_inv_freq(theta: float, dim: int) -> Tensor:
    """θ_i = theta^(-2i/d), i = 0 .. d/2 - 1 (Su et al. 2021, arXiv:2104.09864, eq. 15)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


ScalingFunction = Callable[[float, int, dict, int], "tuple[Tensor, float]"]
SCALING_FUNCTIONS: dict[str, ScalingFunction] = {}


def register_scaling(name: str):
    def add(fn: ScalingFunction) -> ScalingFunction:
        SCALING_FUNCTIONS[name] = fn
        return fn

    return add


@register_scaling("none")
def _no_scaling(theta: float, dim: int, params: dict, seq_len: int) -> tuple[Tensor, float]:
    return rotary_inv_freq(theta, dim), 1.0


@register_scaling("linear")
def _linear(theta: float, dim: int, params: dict, seq_len: int) -> tuple[Tensor, float]:
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595): m -> m / factor, i.e. θ_i / factor."""
    return rotary_inv_freq(theta, dim) / params["factor"], 1.0


@register_scaling("ntk")
def _ntk(theta: float, dim: int, params: dict, seq_len: int) -> tuple[Tensor, float]:
    """NTK-aware (bloc97 2023): base' = base · factor^(d/(d-2)), so the lowest frequency is interpolated by factor."""
    return rotary_inv_freq(theta * params["factor"] ** (dim / (dim - 2)), dim), 1.0


@register_scaling("dynamic_ntk")
def _dynamic_ntk(theta: float, dim: int, params: dict, seq_len: int) -> tuple[Tensor, float]:
    """Dynamic NTK (emozilla 2023; HF `_compute_dynamic_ntk_parameters`): NTK with factor tracking the length L.

    base' = base · (factor·L/L0 − (factor − 1))^(d/(d−2)) for L > L0, the plain base up to L0.
    """
    original, factor = params["original_max_position"], params["factor"]
    if seq_len <= original:
        return rotary_inv_freq(theta, dim), 1.0
    base = theta * (factor * seq_len / original - (factor - 1)) ** (dim / (dim - 2))
    return rotary_inv_freq(base, dim), 1.0


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature: sqrt(1/t) = 0.1·ln(s) + 1 (Peng et al. 2023, eq. 22), applied to q and k alike."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


@register_scaling("yarn")
def _yarn(theta: float, dim: int, params: dict, seq_len: int) -> tuple[Tensor, float]:
    """YaRN "NTK-by-parts" (Peng et al. 2023, arXiv:2309.00071, eq. 17-20; HF `_compute_yarn_parameters`).

    Dimensions that turn more than beta_fast times over the trained length keep their frequency,
    those turning fewer than beta_slow times are interpolated by factor, a linear ramp in between.
    """
    factor, original = params["factor"], params["original_max_position"]
    beta_fast, beta_slow = params.get("beta_fast", 32.0), params.get("beta_slow", 1.0)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over L0
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp (as the reference does)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    inv_freq = rotary_inv_freq(theta, dim)
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    attention_factor = params.get("attention_factor")
    return inv_freq, yarn_attention_factor(factor) if attention_factor is None else float(attention_factor)


@register_scaling("llama3")
def _llama3(theta: float, dim: int, params: dict, seq_len: int) -> tuple[Tensor, float]:
    """Llama 3.1 (Meta 2024; HF `_compute_llama3_parameters`): wavelengths above L0/low_freq_factor are
    divided by factor, those below L0/high_freq_factor kept, a smooth interpolation between."""
    factor, original = params["factor"], params["original_max_position"]
    low_freq_factor, high_freq_factor = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    inv_freq = rotary_inv_freq(theta, dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0


SCALINGS = tuple(SCALING_FUNCTIONS)


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
# The encodings


class PositionEncoding(nn.Module):
    """No position information at all (NoPE; Kazemnejad et al. 2023, arXiv:2305.19466): causal masking only."""

    def embed(self, x: Tensor, offset: int = 0) -> Tensor:
        return x

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        return q, k

    def attention_bias(self, queries: range, k_len: int, device: torch.device, dtype: torch.dtype) -> Optional[Tensor]:
        """(heads, len(queries), k_len) additive scores for queries at key positions `queries` (the last
        q_len of k_len when continuing a cache; a block of them when the mask is built block by block)."""
        return None

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "PositionEncoding":
        return cls()


POSITION_ENCODINGS: dict[str, type[PositionEncoding]] = {}


def register_position(*names: str):
    def add(cls: type[PositionEncoding]) -> type[PositionEncoding]:
        for name in names:
            POSITION_ENCODINGS[name] = cls
        return cls

    return add


register_position("none")(PositionEncoding)


@register_position(*ROTARY_LAYOUTS)
class RotaryEmbedding(PositionEncoding):
    """Rotary position embedding in one of three layouts, with optional XPos and frequency scaling.

    Angles are built in float64 from integer positions and cast to float32 tables, whatever the
    activation dtype: bf16 cannot tell position 2048 from 2049.
    """

    def __init__(self, head_dim: int, variant: str = "complex", theta: float = 10000.0,
                 rotary_dim: Optional[int] = None, xpos_scale_base: Optional[float] = None,
                 scaling: Optional[dict] = None):
        super().__init__()
        if variant not in ROTARY_FUNCTIONS:
            raise ValueError(f"variant: got {variant!r}, expected one of {sorted(ROTARY_FUNCTIONS)}")
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if head_dim % 2 or rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim: need an even rotary_dim <= an even head_dim, got {rotary_dim} and {head_dim}")
        if not theta > 0:
            raise ValueError(f"theta: must be positive, got {theta}")
        if xpos_scale_base is not None and not xpos_scale_base > 0:
            raise ValueError(f"xpos_scale_base: must be positive, got {xpos_scale_base}")
        scaling = dict(scaling or {"type": "none"})
        self.scaling_type = scaling.get("type", "none")
        if self.scaling_type not in SCALING_FUNCTIONS:
            raise ValueError(f"scaling.type: got {self.scaling_type!r}, expected one of {sorted(SCALING_FUNCTIONS)}")
        if self.scaling_type != "none":
            if not scaling.get("factor", 0) > 0:
                raise ValueError(f"scaling.factor: must be positive, got {scaling.get('factor')}")
            if self.scaling_type in ("ntk", "dynamic_ntk") and rotary_dim <= 2:
                raise ValueError(f"rotary_dim: {self.scaling_type} needs rotary_dim > 2, got {rotary_dim}")
            if self.scaling_type in ("dynamic_ntk", "yarn", "llama3") and not scaling.get("original_max_position"):
                raise ValueError(f"scaling.original_max_position: {self.scaling_type} needs the trained length")
            if self.scaling_type == "llama3":  # equal factors would divide by zero: NaN frequencies, no error
                low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
                if not high > low > 0:
                    raise ValueError(f"scaling.high_freq_factor: need high_freq_factor > low_freq_factor > 0, "
                                     f"got {high} and {low}")
        self.variant, self.theta, self.head_dim, self.rotary_dim = variant, float(theta), head_dim, rotary_dim
        self.xpos_scale_base, self.scaling = xpos_scale_base, scaling
        self._rotate = ROTARY_FUNCTIONS[variant]
        # complex and interleaved pair adjacent channels: in eager mode both run as one complex multiplication
        self._pairs_adjacent = variant in ("complex", "interleaved")
        self.dynamic = self.scaling_type == "dynamic_ntk"

        inv_freq, self.attention_factor = self._frequencies(seq_len=0)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        if xpos_scale_base is not None:
            # A plain attribute, not a buffer: module.to(bfloat16) would round log ζ and skew the decay.
            zeta = (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim + 0.4) / 1.4
            self.xpos_log_zeta = zeta.log().float()
        # Built once per length and device, then sliced by every layer and step.
        self._tables: Optional[tuple[Tensor, Tensor]] = None  # cos, sin: (positions, rotary_dim // 2)
        self._tables_for: Optional[int] = None  # the length a dynamic table was built for
        self._tables_inference = False  # built under inference_mode: autograd cannot save them, so rebuilt
        # Query and key tables for positions 0 .. length-1 derived from self._tables: XPos folded in (per
        # length, as its scales are centred on the sequence) and the complex form for adjacent pairs.
        # Keyed by (the cos table they came from, the XPos length, built under inference_mode).
        self._derived: Optional[tuple[Tensor, int, bool, RotationTables, RotationTables]] = None

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "RotaryEmbedding":
        scaling = cfg.rope_scaling.as_dict()
        if scaling is not None and scaling.get("original_max_position") is None:
            scaling["original_max_position"] = cfg.context_length
        return cls(cfg.head_dim, cfg.rope.variant, cfg.rope.theta, cfg.rope.rotary_dim,
                   cfg.rope.xpos_scale_base, scaling)

    def _frequencies(self, seq_len: int) -> tuple[Tensor, float]:
        return SCALING_FUNCTIONS[self.scaling_type](self.theta, self.rotary_dim, self.scaling, seq_len)

    def _cos_sin(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos/sin tables (float32) covering positions 0 .. length-1, attention factor folded in."""
        original = self.scaling.get("original_max_position") or 0
        dynamic = self.dynamic and length > original
        stale = self._tables_inference and not _inference_mode()
        if self._tables is not None and self._tables[0].device == device and not stale:
            cached = self._tables[0].shape[0]
            # Static tables are reused for any shorter length; dynamic ones hold for one length only.
            if (self._tables_for == length) if dynamic else (self._tables_for is None and cached >= length):
                return self._tables
        if dynamic:
            inv_freq = self._frequencies(length)[0]
            size = length
        else:
            inv_freq = self._frequencies(0)[0]
            size = 1 << max(length - 1, 1).bit_length()  # grow geometrically so decoding rebuilds rarely
        angles = torch.outer(torch.arange(size, dtype=torch.float64), inv_freq)
        cos = (angles.cos() * self.attention_factor).float().to(device)
        sin = (angles.sin() * self.attention_factor).float().to(device)
        self._tables, self._tables_for = (cos, sin), (length if dynamic else None)
        self._tables_inference = _inference_mode()
        return cos, sin

    def _side_tables(self, cos: Tensor, sin: Tensor) -> "RotationTables":
        # No complex table inside torch.compile: Inductor generates no code for complex tensors.
        eager_pairs = self._pairs_adjacent and not torch.compiler.is_compiling()
        return RotationTables(cos, sin, torch.complex(cos, sin) if eager_pairs else None)

    def _contiguous_tables(self, length: int, device: torch.device) -> tuple["RotationTables", "RotationTables"]:
        """Query and key tables for positions 0 .. length-1 (plain ones may cover more), built once per length."""
        cos, sin = self._cos_sin(length, device)
        xpos_length = length if self.xpos_scale_base is not None else 0  # plain tables serve every length
        inference = _inference_mode()
        if self._derived is not None and self._derived[0] is cos and self._derived[1] == xpos_length \
                and self._derived[2] <= inference:  # inference tensors cannot serve autograd
            return self._derived[3], self._derived[4]
        if self.xpos_scale_base is None:
            q_tables = k_tables = self._side_tables(cos, sin)
        else:
            positions, centre = torch.arange(length, device=device), length // 2
            q_scale, k_scale = self._xpos_scale(positions, centre, 1.0), self._xpos_scale(positions, centre, -1.0)
            q_tables = self._side_tables(cos[:length] * q_scale, sin[:length] * q_scale)
            k_tables = self._side_tables(cos[:length] * k_scale, sin[:length] * k_scale)
        self._derived = (cos, xpos_length, inference, q_tables, k_tables)
        return q_tables, k_tables

    def _xpos_scale(self, positions: Tensor, centre: int, sign: float) -> Tensor:
        """ζ^(±(m − c)/γ): centred on the sequence so that both signs stay within range."""
        exponent = (positions.float() - centre).unsqueeze(-1) * (sign / self.xpos_scale_base)
        return torch.exp(exponent * self.xpos_log_zeta.to(positions.device))

    def forward(self, q: Tensor, k: Tensor, positions: Optional[Tensor] = None, offset: int = 0,
                key_positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Rotate q (batch, heads, q_len, head_dim) and k (batch, kv_heads, k_len, head_dim).

        positions: LongTensor (q_len,) or (batch, q_len); default offset .. offset + q_len − 1.
        Keys sit at key_positions; by default they end where the queries end (the KV-cache layout).
        """
        q_len, k_len = q.shape[-2], k.shape[-2]
        if positions is None and key_positions is None:
            length = offset + q_len  # a Python int: no device sync, no graph break
            if length < k_len:
                raise ValueError(f"offset: {k_len} keys cannot end at position {length - 1}")
            self._check_xpos_length(length, q.dtype)
            # Contiguous positions: slices of the cached tables; no gather, nothing computed per call.
            q_tables, k_tables = self._contiguous_tables(length, q.device)
            shared = q_tables is k_tables and k_len == q_len  # no XPos, no cache: one slice serves both
            q_tables = q_tables.rows(offset, length)
            k_tables = q_tables if shared else k_tables.rows(length - k_len, length)
        else:
            q_pos = positions if positions is not None else torch.arange(offset, offset + q_len, device=q.device)
            k_pos = key_positions if key_positions is not None else q_pos
            if k_pos.shape[-1] != k_len:
                raise ValueError(f"key_positions: {k_pos.shape[-1]} positions for {k_len} keys")
            if int(min(q_pos.min(), k_pos.min())) < 0:
                raise ValueError("positions: must be non-negative")
            length = int(max(q_pos.max(), k_pos.max())) + 1
            self._check_xpos_length(length, q.dtype)
            cos, sin = self._cos_sin(length, q.device)
            q_cos, q_sin = _gather(cos, q_pos), _gather(sin, q_pos)
            k_cos, k_sin = _gather(cos, k_pos), _gather(sin, k_pos)
            if self.xpos_scale_base is not None:
                centre = length // 2
                q_scale, k_scale = self._xpos_scale(q_pos, centre, 1.0), self._xpos_scale(k_pos, centre, -1.0)
                q_cos, q_sin, k_cos, k_sin = q_cos * q_scale, q_sin * q_scale, k_cos * k_scale, k_sin * k_scale
            q_tables, k_tables = self._side_tables(q_cos, q_sin), self._side_tables(k_cos, k_sin)
        return self._rotate_part(q, q_tables), self._rotate_part(k, k_tables)

    def _check_xpos_length(self, length: int, dtype: torch.dtype) -> None:
        if self.xpos_scale_base is None:
            return
        limit = xpos_max_length(self.xpos_scale_base, dtype)
        if length > limit:
            raise ValueError(f"xpos_scale_base: XPos factors overflow {dtype} past {limit} positions "
                             f"(asked for {length}); use a wider dtype or a larger xpos_scale_base")

    def _rotate_part(self, x: Tensor, tables: "RotationTables") -> Tensor:  # not `_apply`: nn.Module.to uses that name
        cos, sin, rotation = tables
        r = self.rotary_dim
        if not torch.compiler.is_compiling() and triton_applies(x):  # one kernel, any dtype, float32 inside
            rotated = rotate_triton(x[..., :r], cos, sin, self._pairs_adjacent)
            return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)
        if cos.dim() == 3:  # per-batch positions: (batch, seq, r/2) -> broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            rotation = None if rotation is None else rotation.unsqueeze(1)
        part = x[..., :r].float()  # no copy for float32; other dtypes rotate in float32 and round once
        if torch.compiler.is_compiling():
            # Inductor fuses a real-valued reference formula into one kernel per tensor (complex: the
            # interleaved formula, the same pairs without complex tensors, which Inductor cannot generate).
            rotated = (rotate_interleaved if self._pairs_adjacent else rotate_half)(part, cos, sin)
        elif self._pairs_adjacent:
            rotated = rotate_pairs(part, torch.complex(cos, sin) if rotation is None else rotation)
        else:
            rotated = rotate_half_fused(part, cos, sin)
        rotated = rotated.to(x.dtype)
        return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        return self(q, k, offset=offset)

    def extra_repr(self) -> str:
        return (f"variant={self.variant}, theta={self.theta:g}, rotary_dim={self.rotary_dim}, "
                f"xpos_scale_base={self.xpos_scale_base}, scaling={self.scaling_type}")


def _inference_mode() -> bool:
    """torch.is_inference_mode_enabled(), which torch.compile cannot trace; compiled code builds normal tensors."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def _gather(table: Tensor, positions: Tensor) -> Tensor:
    return table[positions]


class RotationTables(NamedTuple):
    """The rotation of one side (queries or keys): (positions, rotary_dim // 2) float32 tables with the
    attention factor and XPos magnitudes folded in; (batch, positions, rotary_dim // 2) for per-batch positions."""

    cos: Tensor
    sin: Tensor
    rotation: Optional[Tensor]  # cos + i·sin (complex64) for the layouts that pair adjacent channels

    def rows(self, start: int, end: int) -> "RotationTables":
        return RotationTables(self.cos[start:end], self.sin[start:end],
                              None if self.rotation is None else self.rotation[start:end])


@register_position("alibi")
class ALiBi(PositionEncoding):
    """ALiBi (Press et al. 2021, arXiv:2108.12409): score(m, n) += −slope_h · (m − n), no embedding at all."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_heads)), persistent=False)

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "ALiBi":
        return cls(cfg.n_heads)

    def attention_bias(self, queries: range, k_len: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(heads, len(queries), k_len) additive bias with the causal mask folded in (−inf on future keys)."""
        # float32 positions are exact below 2^24; built in place, as long evaluations rebuild it per block and layer
        q_pos = torch.arange(queries.start, queries.stop, device=device, dtype=torch.float32)
        distance = q_pos[:, None] - torch.arange(k_len, device=device, dtype=torch.float32)[None, :]
        bias = distance * -self.slopes.to(device)[:, None, None]
        return bias.masked_fill_(distance < 0, float("-inf")).to(dtype)


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


@register_position("sinusoidal")
class SinusoidalEmbedding(PositionEncoding):
    """Absolute sin/cos embedding added to the tokens (Vaswani et al. 2017, arXiv:1706.03762), in the
    timestep-embedding layout: amplitude·[cos(m·ω_i), sin(m·ω_i)], ω_i = 10000^(−i/(d/2)); defined at every
    position.

    from_config sets the amplitude so that each channel's RMS equals the token embeddings' initial std, as a
    learned table starts. The paper balances the two by scaling tokens by √d instead; with std-0.02 tokens
    (and a tied head) a unit-amplitude table is ~35x the tokens and drowns them: on the extrapolation preset
    it trained to a validation loss of 6.0 against 3.9 for every other encoding."""

    def __init__(self, d_model: int, max_period: float = 10000.0, amplitude: float = 1.0):
        super().__init__()
        half = d_model // 2
        self.d_model, self.amplitude = d_model, amplitude
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "SinusoidalEmbedding":
        return cls(cfg.d_model, amplitude=cfg.init_std * math.sqrt(2))  # cos and sin each have RMS 1/√2

    def embed(self, x: Tensor, offset: int = 0) -> Tensor:
        positions = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float64)
        args = positions[:, None] * self.freqs.double()[None, :]
        table = (torch.cat((args.cos(), args.sin()), dim=-1) * self.amplitude).float()
        if table.shape[-1] < self.d_model:  # odd d_model: one zero channel
            table = torch.nn.functional.pad(table, (0, 1))
        return x + table.to(x.dtype)


@register_position("learned")
class LearnedEmbedding(PositionEncoding):
    """Learned absolute positions (GPT-2): one trained vector per position up to the training length."""

    def __init__(self, max_positions: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        self.table = nn.Embedding(max_positions, d_model)
        nn.init.normal_(self.table.weight, std=init_std)

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "LearnedEmbedding":
        return cls(cfg.context_length, cfg.d_model, cfg.init_std)

    @property
    def max_positions(self) -> int:
        return self.table.num_embeddings

    def embed(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.shape[1]
        if end > self.max_positions:
            raise ValueError(f"learned positions cover 0..{self.max_positions - 1} (the training length); "
                             f"asked for position {end - 1}")
        return x + self.table(torch.arange(offset, end, device=x.device))


BASELINES = tuple(name for name in POSITION_ENCODINGS if name not in ROTARY_LAYOUTS)


def build_position_encoding(cfg: "ModelConfig") -> PositionEncoding:
    """The encoding named by cfg.rope.variant, sized for this model."""
    if cfg.rope.variant not in POSITION_ENCODINGS:
        raise ValueError(f"rope.variant: got {cfg.rope.variant!r}, expected one of {sorted(POSITION_ENCODINGS)}")
    return POSITION_ENCODINGS[cfg.rope.variant].from_config(cfg)


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
