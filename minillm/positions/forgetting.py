"""A bias that reads the hidden states: FoX's forget gates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.positions.base import ModelShape, PerLayer, PositionConfig, PositionEncoding, register_position
from minillm.positions.scaling import Scaling
from minillm.registry import require


@register_position("fox")
@dataclass
class ForgettingConfig(PositionConfig):
    """FoX, the Forgetting Transformer (Lin et al. 2025, arXiv:2503.02130): a forget gate per layer, head and token,
    f_t = σ(w_h·x_t + b_h) from the layer's normed input, and the score of query i for key j gains
    D_ij = Σ_{l=j+1..i} log f_l = c_i − c_j, c the cumulative sum of log f. No other position information.

    Checked against zhixuan-lin/forgetting-transformer (`ForgettingAttentionLayer`, fgate_type="full") and
    x-transformers' `DataDependentAlibi`. The reference's FoX (Pro) also gates the output (model.attn_gate), norms
    q and k (model.qk_norm) and shifts keys and values by a token (not here).
    """

    variant: str = "fox"  # the registry name (rope=fox)
    # b_h at initialisation: 0 as the FoX reference (every gate starts at σ(0) = 1/2, fast forgetting);
    # x-transformers' DataDependentAlibi starts at 5 (σ(5) ≈ 0.993, little forgetting)
    gate_bias_init: float = 0.0

    reads_positions: ClassVar[bool] = False  # the bias counts tokens by their order, whatever their positions

    def __post_init__(self) -> None:
        super().__post_init__()
        require(math.isfinite(self.gate_bias_init), "rope.gate_bias_init", f"must be finite, got {self.gate_bias_init}")

    def build(self, shape: ModelShape, scaling: Scaling) -> PerLayer:
        return PerLayer(shape.positional_layers,
                        lambda: ForgetGate(shape.d_model, shape.n_heads, shape.init_std, self.gate_bias_init))


class ForgetGate(PositionEncoding):
    """One layer's forget gates: u_t = log σ(W x_t + b) per head, the increments of the layer's bias (float32, as the
    reference computes log σ of the float32 logits). W ~ N(0, init_std) as the model's linear layers; plain
    parameters rather than an nn.Linear, so that the model's init of its linear layers leaves b as set here."""

    input_dependent = True

    def __init__(self, d_model: int, n_heads: int, init_std: float, bias_init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_heads, d_model) * init_std)
        self.bias = nn.Parameter(torch.full((n_heads,), float(bias_init)))

    def token_increments(self, x: Tensor) -> Tensor:
        return F.logsigmoid(F.linear(x, self.weight, self.bias).float()).transpose(1, 2)  # (batch, heads, seq)
