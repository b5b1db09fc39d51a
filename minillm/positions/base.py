"""The interfaces every position encoding answers: Positions, the model shape, the config registry, PositionEncoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import Tensor, nn

from minillm.positions.scaling import Scaling
from minillm.registry import Registry

if TYPE_CHECKING:
    from minillm.positions.rotary import Rotation

DEFAULT_ENCODING = "complex"  # RoPE in LLaMA's layout: what a config that names no encoding gets

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


POSITION_ENCODINGS = Registry("rope.variant", field="variant", default=DEFAULT_ENCODING, names_class=False)
register_position = POSITION_ENCODINGS.register


@register_position("none")
@dataclass
class PositionConfig:
    """NoPE (Kazemnejad et al. 2023, arXiv:2305.19466): no position information, causal masking only."""

    variant: str = "none"  # the encoding's registry name, as rope=<name> chooses it

    # What other parts may ask of any encoding: these, and the methods below them (tags, rotary_spectrum,
    # max_position), answered by every encoding, so that no caller tests for a class.
    rotary: ClassVar[bool] = False
    absolute: ClassVar[bool] = False  # positions added to the token embeddings, so no layer can do without them
    contextual: ClassVar[bool] = False  # positions counted from the attention scores (CoPE), not given
    # The model's given positions change its output: False for NoPE and CoPE, which a position sampler cannot move.
    reads_positions: ClassVar[bool] = False

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

    def tags(self) -> list[str]:
        """W&B tags for this encoding's settings, beside rope=<variant> (rotary: theta and XPos)."""
        return []

    def rotary_spectrum(self, head_dim: int) -> Optional[tuple[int, float]]:
        """(rotary_dim, theta) of the channels that turn, at θ_i = theta^(−2i/rotary_dim), as built for heads of
        head_dim: what RoPE-base theory (minillm.eval.theory) is about; None when no channel turns."""
        return None

    def max_position(self, context_length: int) -> Optional[int]:
        """One past the largest position the encoding has a value for, in a model trained at context_length
        (the learned table's rows); None: any position."""
        return None

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
    return POSITION_ENCODINGS.build({"variant": d} if isinstance(d, str) else d, "rope")


# ----------------------------------------------------------------------------------------------
# The encodings


class PositionEncoding(nn.Module):
    """No position information at all: every answer is the identity (NoPE)."""

    max_length: Optional[int] = None  # the longest sequence the encoding is defined for; None: any
    contextual: bool = False  # positions from the attention scores: the layer adds context_logits (CoPE)
    input_dependent: bool = False  # a bias from the layer's input: the layer adds sums of token_increments (FoX)

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

    def token_increments(self, x: Tensor) -> Optional[Tensor]:
        """A bias that reads the layer's input: x (batch, seq, d_model), the normed input q, k and v are read from
        -> u (batch, heads, seq) float32, and the score of query i for key j gains Σ_{t=j+1..i} u_t, a sum over the
        tokens in between (by their order, cache included; not by position). None: no such bias."""
        return None

    def rescaled(self, scaling: Scaling) -> "PositionEncoding":
        """This encoding with another frequency scaling; only rotary encodings have one."""
        if scaling.name == "none":
            return self
        raise ValueError(f"scaling: {scaling.name!r} needs a rotary model, this one uses {type(self).__name__}")


class PerLayer(PositionEncoding):
    """An encoding with parameters of its own in each layer that sees positions (FIRE, CoPE): one part per such
    layer, built by `make`; a position-free layer (model.nope_every) has none to leave untrained."""

    def __init__(self, layers: tuple[int, ...], make: Callable[[], PositionEncoding]):
        super().__init__()
        self.layers = nn.ModuleDict({str(layer): make() for layer in layers})

    def for_layer(self, layer: int) -> PositionEncoding:
        return self.layers[str(layer)]
