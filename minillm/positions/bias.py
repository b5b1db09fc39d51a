"""Relative encodings as a bias on the attention scores: ALiBi, T5, KERPLE, FIRE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

from minillm.positions.base import ModelShape, PerLayer, PositionConfig, PositionEncoding, register_position
from minillm.positions.scaling import Scaling
from minillm.registry import finite, positive, require


@register_position("alibi")
@dataclass
class ALiBiConfig(PositionConfig):
    """ALiBi (Press et al. 2021, arXiv:2108.12409): a linear distance penalty per head on the scores."""

    variant: str = "alibi"  # the registry name (rope=alibi)

    reads_positions: ClassVar[bool] = True

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

    variant: str = "t5"  # the registry name (rope=t5)
    num_buckets: int = 32  # learned scalars per head: half for exact distances, half logarithmically spaced
    max_distance: int = 128  # distances from here on share the last bucket

    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_buckets >= 2, "rope.num_buckets", f"must be at least 2, got {self.num_buckets}")
        require(self.max_distance > self.num_buckets // 2, "rope.max_distance",
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

    variant: str = "kerple"  # the registry name (rope=kerple)
    kind: str = "log"  # log | power

    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.kind in ("log", "power"), "rope.kind", f"got {self.kind!r}, expected 'log' or 'power'")

    @property
    def label(self) -> str:
        return f"kerple-{self.kind}"

    def build(self, shape: ModelShape, scaling: Scaling) -> "KerpleBias":
        return KerpleBias(shape.n_heads, self.kind)


class KerpleBias(PositionEncoding):
    """The kernel's parameters, shared by every layer as in chijames/KERPLE, initialised as there and kept
    positive by clamping at 0.01 in the forward (power: r₂ ≤ 2, the kernel's range)."""

    MIN = 0.01
    # U(0, scale) for (r₁, r₂), as chijames/KERPLE draws them: the log kernel's multiplier spans (0, 2) and its
    # inner scale (0, 1); the power kernel's multiplier (0, 1) and its exponent (0, 2), the whole allowed range.
    INIT_SCALES = {"log": (2.0, 1.0), "power": (1.0, 2.0)}

    def __init__(self, n_heads: int, kind: str = "log"):
        super().__init__()
        self.kind = kind
        r1_scale, r2_scale = self.INIT_SCALES[kind]
        self.r1 = nn.Parameter(torch.rand(n_heads) * r1_scale)
        self.r2 = nn.Parameter(torch.rand(n_heads) * r2_scale)

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

    variant: str = "fire"  # the registry name (rope=fire)
    mlp_width: int = 32  # hidden units of the MLP from the normalised distance to one bias per head
    init_c: float = 0.1  # the initial c of ψ(x) = log(c·x + 1), learned
    init_threshold: Optional[float] = None  # L: the normaliser follows the query past it; None: the training length

    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.mlp_width >= 1, "rope.mlp_width", f"must be at least 1, got {self.mlp_width}")
        positive(self.init_c, "rope.init_c")
        require(self.init_threshold is None or (math.isfinite(self.init_threshold) and self.init_threshold > 0),
                 "rope.init_threshold", f"must be a finite positive number (or null: the training length), got "
                 f"{self.init_threshold}")
        finite(self, "rope", FireConfig)

    def build(self, shape: ModelShape, scaling: Scaling) -> "PerLayer":
        threshold = float(self.init_threshold if self.init_threshold is not None else shape.context_length)
        # One per layer, as in the reference (mcleish7/arithmetic, cramming/architectures/embeddings.py).
        return PerLayer(shape.positional_layers,
                        lambda: FireBias(shape.n_heads, self.mlp_width, self.init_c, threshold))


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
