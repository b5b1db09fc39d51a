"""Absolute encodings added to the token embeddings: sinusoidal and learned."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from minillm.positions.base import ModelShape, PositionConfig, PositionEncoding, Positions, register_position
from minillm.positions.scaling import Scaling
from minillm.registry import finite, require


@register_position("sinusoidal")
@dataclass
class SinusoidalConfig(PositionConfig):
    """Absolute sin/cos embedding added to the tokens (Vaswani et al. 2017, arXiv:1706.03762).

    The amplitude makes each channel's RMS equal the token embeddings' initial std, as a learned table
    starts. The paper balances the two by scaling tokens by √d instead; with std-0.02 tokens (and a tied
    head) a unit-amplitude table is ~35x the tokens and drowns them: on the extrapolation preset it trained
    to a validation loss of 6.0 against 3.9 for every other encoding.
    """

    variant: str = "sinusoidal"  # the registry name (rope=sinusoidal)
    max_period: float = 10000.0  # the slowest channel's period in positions; above 1

    absolute: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        # inf would make every frequency 0: the same embedding at every position
        require(math.isfinite(self.max_period) and self.max_period > 1, "rope.max_period",
                 f"must be a finite number above 1, got {self.max_period}")
        finite(self, "rope", SinusoidalConfig)

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

    variant: str = "learned"  # the registry name (rope=learned)

    absolute: ClassVar[bool] = True
    reads_positions: ClassVar[bool] = True

    def max_position(self, context_length: int) -> int:
        return context_length  # the table's rows (build)

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
