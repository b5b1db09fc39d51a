"""Typed records of every measurement, one per (model, setting, length), and Results that hold them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class PositionBucket:
    """Mean loss of the targets at window positions [position_start, position_end)."""

    position_start: int
    position_end: int
    loss: float
    tokens: int


@dataclass
class Perplexity:
    """One model at one length: the measurement itself."""

    length: int
    loss: Optional[float]
    ppl: Optional[float]
    loss_beyond_train: Optional[float] = None  # mean loss of targets past the training length
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    by_position: list[PositionBucket] = field(default_factory=list)


@dataclass
class ModelInfo:
    """Which model was measured: its label, run folder name, seed, training length, encoding, checkpoint."""

    model: str
    run: str
    seed: int
    trained_length: int
    variant: str
    checkpoint: str


@dataclass
class PerplexityRecord(Perplexity):
    """A Perplexity with what was measured: the model and the evaluation setting."""

    model: str = ""
    run: str = ""
    seed: int = 0
    trained_length: int = 0
    variant: str = ""
    checkpoint: str = ""
    method: str = "none"  # the frequency scaling at evaluation
    attention: str = "full"
    stride: Optional[int] = None
    factor: Optional[float] = None
    applicable: bool = True  # False: the encoding is undefined at this length (see note)
    note: Optional[str] = None


@dataclass
class PasskeyRecord:
    """Passkey retrieval of one model at one (scaling, attention, length, depth)."""

    model: str
    run: str
    seed: int
    method: str  # the frequency scaling at evaluation
    attention: str
    length: int
    depth: float
    trials: int
    exact_match: float
    key_logprob: float  # mean log-probability of the key's tokens (nats)


@dataclass
class TheoryRecord:
    """What the RoPE-base literature predicts for one rotary model at one length."""

    model: str
    run: str
    rotary_dim: int
    theta: float
    trained_length: int
    critical_dim: int  # Liu et al. 2023
    extrapolation_bound: float  # Liu et al. 2023: T_extra
    length: int
    min_base: float  # Men et al. 2024
    supported_length: int  # Men et al. 2024: the longest length this base supports, up to `length`


@dataclass
class TailLossRecord:
    """ReRoPE's protocol: the mean loss on the same last `targets` tokens of each document, read with `length`
    tokens of context in all (targets = the training length). More context helping lowers it; windowed
    perplexity mixes that with position."""

    model: str
    run: str
    seed: int
    trained_length: int
    method: str
    attention: str
    length: int
    targets: int
    loss: float
    tokens: int


@dataclass
class AccuracyRecord:
    """A run trained on a synthetic task, at one (scaling, attention, length) on the task's test examples: exact
    match per answer and accuracy per answer token, each with its Wilson 95% interval, and the answer-only loss.
    The measured fields are None where the setting does not apply (see note)."""

    model: str
    run: str
    seed: int
    trained_length: int
    variant: str
    task: str
    method: str  # the frequency scaling at evaluation
    attention: str
    length: int
    examples: int = 0
    answers: int = 0
    tokens: int = 0  # answer tokens
    exact_match: Optional[float] = None
    exact_match_low: Optional[float] = None
    exact_match_high: Optional[float] = None
    token_accuracy: Optional[float] = None
    token_accuracy_low: Optional[float] = None
    token_accuracy_high: Optional[float] = None
    answer_loss: Optional[float] = None  # mean cross-entropy of the answer tokens (nats)
    applicable: bool = True  # False: the task refuses this length or the encoding cannot reach it (see note)
    note: Optional[str] = None
    seconds: float = 0.0


@dataclass
class EffectiveLengthRecord:
    """The effective length (see `effective_length`) of one run under one (scaling, attention)."""

    model: str
    run: str
    seed: int
    trained_length: int
    variant: str
    task: str
    method: str
    attention: str
    threshold: float
    reference_exact_match: Optional[float]  # the exact match at the training length; None: not evaluated there
    effective_length: Optional[int]
    longest_length: Optional[int]  # the longest length measured: an effective length equal to it is a lower bound
    min_reference: float = 0.0  # below this exact match at the training length, effective_length is None


@dataclass
class Results:
    """Everything one evaluation measured."""

    perplexity: list[PerplexityRecord] = field(default_factory=list)
    passkey: list[PasskeyRecord] = field(default_factory=list)
    theory: list[TheoryRecord] = field(default_factory=list)
    tail: list[TailLossRecord] = field(default_factory=list)
    accuracy: list[AccuracyRecord] = field(default_factory=list)
    effective_length: list[EffectiveLengthRecord] = field(default_factory=list)
    precision: Optional[str] = None  # the dtype the models computed in ("float32", "bfloat16"), and why
    precision_reason: Optional[str] = None

    def extend(self, other: "Results") -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            if isinstance(getattr(self, name), list):
                getattr(self, name).extend(getattr(other, name))
