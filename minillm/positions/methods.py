"""Attention methods at evaluation time: which keys each query sees, and at which positions (training-free extension).

A method turns a forward's `Positions` into one or more `Part`s. Each part is a set of attention scores computed
with its own query and key positions over the (query, key) pairs its pattern admits; the parts of one query never
overlap, and their union is attended with a single softmax (the model merges the parts by their log-sum-exp,
which is exact). One part at the model's own positions is a plain mask (sliding, blockwise); two parts are how
Self-Extend, ReRoPE, LM-Infinite and StreamingLLM's positions are computed without retraining.

Patterns are functions of query and key *indices* (i, j: the token's place in the sequence, cache included), so
the model evaluates them a block of rows at a time and never holds a whole (length × length) mask. Every pattern
is a subset of causal attention. Most are a `Window` (a band of distances), whose blocks know their keys without
evaluating a pair: each block of queries then attends only to the keys it sees, unmasked where all of them do. Adding a method means one config class registered with `@register_method`:
its knobs (defaults stated as rules of the training length L), `check` and `parts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from minillm.positions.base import Positions
from minillm.registry import Registry, finite, positive, require

Pattern = Callable[[Tensor, Tensor], Tensor]  # (query index (q, 1), key index (1, k)) -> bool, True = in this part


@dataclass(frozen=True)
class Window:
    """The pattern of keys at distances d_min ≤ i − j ≤ d_max (None: no limit) and indices j < key_stop (None: any).

    Causal attention is Window(0); a sliding window of W is Window(0, W − 1); what lies beyond it, Window(W).
    Being a pattern of (i, j) it is called like any; being a window it also says, without evaluating a single
    pair, which keys a block of queries may see and which all of them see (model.BlockedMask), so each block
    attends only to its keys and builds a mask only where its queries disagree.
    """

    d_min: int = 0
    d_max: Optional[int] = None
    key_stop: Optional[int] = None

    def __call__(self, i: Tensor, j: Tensor) -> Tensor:
        distance = i - j
        seen = distance >= self.d_min
        if self.d_max is not None:
            seen = seen & (distance <= self.d_max)
        return seen if self.key_stop is None else seen & (j < self.key_stop)

    def keys(self, first: int, last: int, k_len: int) -> tuple[range, range]:
        """For queries at indices first..last over k_len keys: (the keys some query sees, the keys every one
        sees), each a range, possibly empty."""
        stop = k_len if self.key_stop is None else min(k_len, self.key_stop)
        lowest = lambda i: 0 if self.d_max is None else max(0, i - self.d_max)  # noqa: E731
        some = range(lowest(first), max(lowest(first), min(stop, last - self.d_min + 1)))
        every = range(lowest(last), max(lowest(last), min(stop, first - self.d_min + 1)))
        return some, every


@dataclass
class Part:
    """Scores of queries at positions.query against keys at positions.key, over the pairs `pattern` admits
    (None: every causal pair)."""

    positions: Positions
    pattern: Optional[Pattern] = None


def _at(query: Tensor, key: Tensor, like: Positions) -> Positions:
    """Positions for one part; `length` stays the sequence's, so dynamic scalings and XPos see the real length."""
    return Positions(query, key, like.length)


ATTENTION_METHODS = Registry("attention")  # chosen by name (attention=[...]), knobs under methods.<name>
register_method = ATTENTION_METHODS.register


@register_method("full")
@dataclass
class AttentionMethod:
    """Plain causal attention over the whole sequence, at the model's own positions."""

    name: ClassVar[str] = "full"
    # What the encoding must be for the method to mean anything: "any"; "relative" (positions enter attention in
    # every layer: rotary, a bias or none at all, not absolute embeddings nor CoPE's counted positions); "rotary".
    needs: ClassVar[str] = "any"

    def check(self, trained_length: int) -> None:
        """Raise, naming the setting, if the knobs make no sense for a model trained at `trained_length`
        (knobs that need no length are checked when the config is built)."""

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        return [Part(positions)]

    def knob(self, value: Optional[int], default: int) -> int:
        return default if value is None else int(value)


@register_method("blockwise")
@dataclass
class Blockwise(AttentionMethod):
    """Blockwise causal (Sun et al. 2022, arXiv:2212.10554, sec. 3.3): blocks of L/2 tokens attend causally to
    their own block and the one before, so no query sees keys L or more positions back."""

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        block = max(trained_length // 2, 1)
        return [Part(positions, lambda i, j: (j <= i) & (i // block - j // block <= 1))]


@register_method("sliding")
@dataclass
class Sliding(AttentionMethod):
    """Sliding window: each query sees the last `window` keys, itself included (default: the training length)."""

    window: Optional[int] = None  # keys each query sees, itself included; None: the training length

    def __post_init__(self) -> None:
        require(self.window is None or self.window >= 1, "methods.sliding.window", f"must be at least 1, got {self.window}")

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        window = self.knob(self.window, trained_length)
        return [Part(positions, Window(0, window - 1))]


@register_method("self_extend")
@dataclass
class SelfExtend(AttentionMethod):
    """Self-Extend (Jin et al. 2024, arXiv:2401.01325; datamllab/LongLM `self_extend_patch/Llama.py`).

    Neighbour attention at the model's positions where i − j < W; beyond, grouped positions: ⌊j/G⌋ for keys and
    ⌊i/G⌋ + W − ⌊W/G⌋ for queries, so that the grouped distances continue the neighbour ones. Both score sets
    share one softmax. Defaults: G = 8, W = L/2 (the paper's rule: it reaches (L − W)·G + W tokens).
    """

    group: int = 8  # G: positions past the window are grouped G to one
    window: Optional[int] = None  # W: distances below it keep the model's positions; None: L/2

    needs: ClassVar[str] = "relative"

    def __post_init__(self) -> None:
        require(self.group >= 1, "methods.self_extend.group", f"must be at least 1, got {self.group}")
        require(self.window is None or self.window >= 1, "methods.self_extend.window",
                 f"must be at least 1, got {self.window}")

    def check(self, trained_length: int) -> None:
        window = self.knob(self.window, trained_length // 2)
        require(1 <= window < trained_length, "methods.self_extend.window",
                 f"must lie in [1, {trained_length}) (below the training length), got {window}")

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        group, window = self.group, self.knob(self.window, trained_length // 2)
        grouped = _at(torch.div(positions.query, group, rounding_mode="floor") + window - window // group,
                      torch.div(positions.key, group, rounding_mode="floor"), positions)
        return [Part(positions, Window(0, window - 1)), Part(grouped, Window(window))]


@register_method("rerope")
@dataclass
class ReRoPE(AttentionMethod):
    """ReRoPE (Su 2023, bojone/rerope; jquesnelle/yarn `scaled_rope/LlamaReRoPE.py`): relative distance
    r' = min(r, w). Past w the query is turned by w and the key not at all. Default w = L/2."""

    window: Optional[int] = None  # w: distances are capped at it; None: L/2

    needs: ClassVar[str] = "rotary"

    def __post_init__(self) -> None:
        require(self.window is None or self.window >= 1, f"methods.{self.name}.window",
                 f"must be at least 1, got {self.window}")

    def check(self, trained_length: int) -> None:
        window = self.knob(self.window, trained_length // 2)
        require(1 <= window < trained_length, f"methods.{self.name}.window",
                 f"must lie in [1, {trained_length}) (below the training length), got {window}")

    def far(self, positions: Positions, window: int) -> Positions:
        return _at(torch.full_like(positions.query, window), torch.zeros_like(positions.key), positions)

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        window = self.knob(self.window, trained_length // 2)
        return [Part(positions, Window(0, window - 1)), Part(self.far(positions, window), Window(window))]


@register_method("leaky_rerope")
@dataclass
class LeakyReRoPE(ReRoPE):
    """Leaky ReRoPE (Su 2023): r' = w + (r − w)/k past w, i.e. queries at i/k + w(1 − 1/k) and keys at j/k
    (fractional positions); k = 16 by default, w = L/2."""

    k: float = 16.0  # distances past w grow 1/k as fast

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self.k, "methods.leaky_rerope.k")
        finite(self, "methods.leaky_rerope", LeakyReRoPE)

    def far(self, positions: Positions, window: int) -> Positions:
        return _at(positions.query.double() / self.k + window * (1 - 1 / self.k), positions.key.double() / self.k,
                   positions)


@register_method("lm_infinite")
@dataclass
class LMInfinite(AttentionMethod):
    """LM-Infinite (Han et al. 2024, arXiv:2308.16137; Glaciohound/LM-Infinite `models/llama.py`): a Λ-shaped
    pattern, the first n_global tokens and the last n_local; global keys outside the local window sit at
    distance `limit` (the query turned by it, the key not at all). Defaults: n_global 10, n_local = limit = L."""

    n_global: int = 10  # the first tokens every query sees
    n_local: Optional[int] = None  # the last keys every query sees; None: L
    limit: Optional[int] = None  # the distance the global keys are seen at; None: L

    needs: ClassVar[str] = "relative"

    def __post_init__(self) -> None:
        require(self.n_global >= 0, "methods.lm_infinite.n_global", f"must be >= 0, got {self.n_global}")

    def check(self, trained_length: int) -> None:
        for name in ("n_local", "limit"):
            value = self.knob(getattr(self, name), trained_length)
            require(1 <= value <= trained_length, f"methods.lm_infinite.{name}",
                     f"must lie in [1, {trained_length}] (the training length), got {value}")

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        n_global, n_local = self.n_global, self.knob(self.n_local, trained_length)
        limit = self.knob(self.limit, trained_length)
        far = _at(torch.full_like(positions.query, limit), torch.zeros_like(positions.key), positions)
        return [Part(positions, Window(0, n_local - 1)), Part(far, Window(n_local, key_stop=n_global))]


@register_method("sinks")
@dataclass
class AttentionSinks(AttentionMethod):
    """StreamingLLM (Xiao et al. 2024, arXiv:2309.17453; mit-han-lab/streaming-llm `kv_cache.py`): the first
    `start` tokens and the last `recent` keys, positions re-assigned inside that cache (pos-shift): recent keys
    keep their distance, a sink j is seen from position min(i, start + recent − 1). Defaults: start 4,
    recent = L − 4, so the cache holds L tokens."""

    start: int = 4  # the first tokens kept (the sinks)
    recent: Optional[int] = None  # the last keys kept; None: L − start

    needs: ClassVar[str] = "relative"

    def __post_init__(self) -> None:
        require(self.start >= 0, "methods.sinks.start", f"must be >= 0, got {self.start}")
        require(self.recent is None or self.recent >= 1, "methods.sinks.recent", f"must be at least 1, got {self.recent}")

    def check(self, trained_length: int) -> None:
        require(self.start < trained_length, "methods.sinks.start",
                 f"must be below the training length {trained_length}, got {self.start}")
        recent = self.knob(self.recent, trained_length - self.start)
        require(recent >= 1, "methods.sinks.recent", f"must be at least 1, got {recent}")

    def parts(self, positions: Positions, trained_length: int) -> list[Part]:
        start, recent = self.start, self.knob(self.recent, trained_length - self.start)
        shifted = _at(positions.query.clamp(max=start + recent - 1), positions.key, positions)
        return [Part(positions, Window(0, recent - 1)), Part(shifted, Window(recent, key_stop=start))]


def attention_method(name: str, settings: "dict | AttentionMethod | None" = None) -> AttentionMethod:
    """The registered method `name` with its knobs (a dict as Hydra gives it, or the config itself)."""
    ATTENTION_METHODS.lookup(name)
    if isinstance(settings, AttentionMethod):
        return settings
    return ATTENTION_METHODS.build(settings or {}, f"methods.{name}", name=name)


def check_encoding(method: AttentionMethod, rope, trained_length: int) -> None:
    """Raise, naming the method, if the model's encoding (its PositionConfig) cannot serve it."""
    method.check(trained_length)
    multi = method.needs != "any"
    if method.needs == "rotary":
        require(rope.is_rotary, "attention", f"{method.name} turns rotary positions; rope.variant={rope.variant!r} "
                                              f"is not rotary")
    if multi:
        require(not rope.absolute and not rope.contextual, "attention",
                 f"{method.name} gives parts of the scores their own positions, which rope.variant={rope.variant!r} "
                 f"cannot take ({'positions are added to the tokens' if rope.absolute else 'positions are counted from the scores'})")
