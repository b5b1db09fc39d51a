"""Effective length (RULER's, Hsieh et al. 2024, arXiv:2404.06654) of any score measured at several lengths, with
Wilson intervals per length and an interval on the effective length itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

from minillm.data.answers import wilson_interval


@dataclass(frozen=True)
class Cell:
    """One length's score: a proportion in [0, 1] (exact match, RULER's string match) over `samples` samples."""

    length: int
    score: float
    samples: int  # the trials behind the score (answers, prompts): its Wilson interval's n

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The Wilson score interval of the score (a partial-credit score counts score × samples successes)."""
        return wilson_interval(self.score * self.samples, self.samples, z)


@dataclass(frozen=True)
class EffectiveLength:
    """What `effective_length` found: the length, its interval [low, high], and the bar the scores were held to.
    A length None: no evaluated length passes (the shortest already fails, or no bar: see `effective_length`)."""

    length: Optional[int]
    low: Optional[int]  # the effective length of the cells' Wilson lower bounds
    high: Optional[int]  # ... of their upper bounds
    bar: Optional[float]  # the score each length up to the effective length keeps; None: no bar (no reference)
    reference: Optional[float]  # the score at the training length; None: not evaluated there
    shortest: Optional[int]  # the shortest length evaluated: an effective length None is shorter
    longest: Optional[int]  # the longest length evaluated: an effective length equal to it is a lower bound
    samples: int  # the fewest samples behind any cell

    @property
    def reached_longest(self) -> bool:
        """Whether the effective length is the longest length evaluated (the true one may lie beyond)."""
        return self.length is not None and self.length == self.longest


def _passing_prefix(lengths: list[int], scores: list[float], bar: float) -> Optional[int]:
    """The longest length up to which every score (in length order) is at least bar; a dip ends it."""
    longest = None
    for length, score in zip(lengths, scores):
        if score < bar:
            break
        longest = length
    return longest


def effective_length(cells: Iterable[Union[Cell, tuple[int, float, int]]], *, trained_length: Optional[int] = None,
                     threshold: float = 0.85, absolute: Optional[float] = None, min_reference: float = 0.0,
                     z: float = 1.96) -> EffectiveLength:
    """The effective length of one model under one setting from its (length, score, samples) cells, one per length.

    The rule (RULER, arXiv:2404.06654): the longest evaluated length L such that the score at L and at every
    shorter evaluated length is at least a bar; a dip ends it (a length that recovers after a failing one does not
    count). The bar is
      - absolute (absolute given): a fixed score, RULER's 85.6% (Llama-2-7B's at 4k) being 0.856;
      - relative (otherwise): threshold × the model's own score at trained_length, since tasks differ in
        difficulty; NoLiMa (arXiv:2502.05167) takes 0.85 of a base score too, the model's at a short context
        rather than at its training length. No bar, and so no effective length, when
        trained_length was not evaluated, or the score there is 0 or below min_reference (a model that did not
        learn the task has no length to keep: at 1 right answer in 256, a bar of 0.85/256 passes every length).

    The interval [low, high]: the same rule, against the same bar, applied to every cell's Wilson score interval
    (z: 1.96 for 95%) lower bound (low) and upper bound (high); low <= length <= high, None counting as shortest.
    The bar is the point estimate's: the reference score's own uncertainty is not carried into it.
    """
    measured = sorted((c if isinstance(c, Cell) else Cell(*c) for c in cells), key=lambda c: c.length)
    lengths = [c.length for c in measured]
    repeated = sorted(n for n in set(lengths) if lengths.count(n) > 1)
    if repeated:
        raise ValueError(f"effective_length: takes the records of one run under one scaling and attention (one cell "
                         f"per length), got two at one length ({repeated})")
    reference = next((c.score for c in measured if c.length == trained_length), None)
    shortest, longest = (lengths[0], lengths[-1]) if lengths else (None, None)
    samples = min((c.samples for c in measured), default=0)
    if absolute is not None:
        bar = absolute
    elif reference and reference >= min_reference:
        bar = threshold * reference
    else:
        return EffectiveLength(None, None, None, None, reference, shortest, longest, samples)
    bounds = [c.interval(z) for c in measured]
    return EffectiveLength(_passing_prefix(lengths, [c.score for c in measured], bar),
                           _passing_prefix(lengths, [low for low, _ in bounds], bar),
                           _passing_prefix(lengths, [high for _, high in bounds], bar),
                           bar, reference, shortest, longest, samples)


def effective_length_text(found: EffectiveLength) -> str:
    """'256 [128–512]' with its interval; '≥1024' where it is the longest length evaluated, '<64' where even the
    shortest (64) fails; 'n/a' without a bar."""
    def one(length: Optional[int]) -> str:
        if length is None:
            return f"<{found.shortest}"
        return ("≥" if length == found.longest else "") + str(length)

    if found.bar is None:
        return "n/a"
    return f"{one(found.length)} [{one(found.low)}–{one(found.high)}]"
