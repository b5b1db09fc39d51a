"""Extrapolation measurements: perplexity and loss against length and position, passkey retrieval, RoPE theory,
the accuracy and effective length of runs trained on a synthetic task, and the evaluation loop over
checkpoints × scalings × attention patterns × lengths.

Everything here returns typed records (dataclasses); minillm.report turns them into tables and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.attention import AttentionMethod, attention_method, check_encoding
from minillm.config import EvalConfig
from minillm.model import QueryTemperature, Transformer
from minillm.precision import eval_dtype
from minillm.scaling import SCALINGS, Scaling
from minillm.synthetic import IGNORE, Accuracy, TaskConfig, accuracy, validation_set
from minillm.theory import critical_dimension, minimum_base, supported_length

log = logging.getLogger("minillm")


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


# ----------------------------------------------------------------------------------------------
# Inference-time frequency scaling of a trained rotary model (no retraining)


def scaling_for(method: str, length: int, trained_length: int, given: Optional[float]) -> Scaling:
    """The scaling `method` for an evaluation at `length`: factor = given, else the method's own rule
    (length / trained length; dynamic NTK: 1)."""
    cls = SCALINGS[method]
    if cls.name == "none":
        return cls()
    factor = given if given is not None else cls().factor_for(length, trained_length)
    return cls(factor=factor, original_max_position=trained_length)


@contextlib.contextmanager
def log_n_queries(model: Transformer, enabled: bool) -> Iterator[Transformer]:
    """Temporarily scale a model's queries by max(1, log_L(i + 1)) (Qwen's log-n, L the training length), as
    ReRoPE's evaluation does; a model that already scales its queries is refused."""
    if not enabled:
        yield model
        return
    trained = model.cfg.context_length
    if model.cfg.attn_temperature != "none" or trained < 2:
        raise ValueError(f"logn: the model already scales its queries (model.attn_temperature="
                         f"{model.cfg.attn_temperature!r})" if trained >= 2 else
                         f"logn: needs a training length of at least 2, got {trained}")
    device = next(model.parameters()).device
    for block in model.blocks:
        block.attn.temperature = QueryTemperature("logn", model.cfg.n_heads, trained).to(device)
    try:
        yield model
    finally:
        for block in model.blocks:
            block.attn.temperature = None


def rotary_key(model: Transformer, length: int) -> Optional[tuple]:
    """What a window of `length` tokens is rotated with (frequencies and temperature), hashable; None for a
    model without rotary frequencies. Equal keys, equal measurements."""
    frequencies = getattr(model.position, "_frequencies", None)
    if frequencies is None:
        return None
    inv_freq, attention_factor = frequencies(length)
    return inv_freq.cpu().numpy().tobytes(), float(attention_factor)


@contextlib.contextmanager
def scaled_rope(model: Transformer, scaling: Scaling) -> Iterator[Transformer]:
    """Temporarily give a rotary model another frequency scaling; its weights are untouched. "none" keeps
    the encoding the model was built with (its training-time scaling, if it had one)."""
    original = model.position
    model.position = original.rescaled(scaling)
    try:
        yield model
    finally:
        model.position = original


# ----------------------------------------------------------------------------------------------
# Perplexity at each length, on the same tokens for every length


def evaluation_tokens(documents: list[np.ndarray], max_length: int, max_documents: int) -> Tensor:
    """The first max_length + 1 tokens of each document at least that long: (n_docs, max_length + 1)."""
    rows = [torch.from_numpy(np.asarray(doc[: max_length + 1], dtype=np.int64))
            for doc in documents if len(doc) >= max_length + 1][:max_documents]
    if not rows:
        raise ValueError(f"lengths: no validation document has {max_length + 1} tokens")
    return torch.stack(rows)


def windows(tokens: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows: inputs and targets (n_windows, length) covering tokens[:, 1:] up to each
    document's last whole window, i.e. the same targets for every length dividing tokens.shape[1] − 1."""
    n_docs, total = tokens.shape[0], tokens.shape[1] - 1
    per_doc = total // length
    starts = torch.arange(per_doc) * length
    index = starts[:, None] + torch.arange(length + 1)[None, :]
    chunks = tokens[:, index].reshape(n_docs * per_doc, length + 1)
    return chunks[:, :-1], chunks[:, 1:]


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the resident-set high-water mark (VmHWM) to the current resident set
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory (since the last reset on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**10
    except (OSError, AttributeError):
        scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


MAX_ATTENTION_PAIRS = 2**24  # per forward pass: 4 windows of 2048 tokens, 1 of 4096


@torch.inference_mode()
def perplexity_at_length(model: Transformer, tokens: Tensor, length: int, *, attention: "str | AttentionMethod" = "full",
                         stride: Optional[int] = None, batch_size: int = 4, buckets: int = 16) -> "Perplexity":
    """Mean loss over the targets of `tokens` (n_docs, T + 1) scored with windows of `length` tokens.

    stride=None (or ≥ length): non-overlapping windows (each token sees its window's past), whole
    windows only, so the targets scored are the same for every length dividing T. stride=S: the sliding
    protocol of the ALiBi paper (Press et al. 2021, sec. 4.2): windows advance by S and only their last
    S targets are scored, so every scored token but those of the first window sees ≥ length − S tokens.

    batch_size: windows per forward pass, at most; fewer for long windows, so that a pass never holds
    more than MAX_ATTENTION_PAIRS query-key pairs: SDPA's fused kernels hold no scores, but its math path,
    taken wherever no fused kernel fits the device, dtype or mask, holds batch × heads × length² of them.

    seconds: wall time of the forward passes. peak_memory_mb: on CUDA the peak allocated GPU memory; on
    CPU the process's peak resident memory while this length ran (weights, data and interpreter
    included; on systems without /proc/self/clear_refs, the peak since the process started).
    """
    device = next(model.parameters()).device
    trained = model.cfg.context_length
    method = attention_method(attention) if isinstance(attention, str) else attention
    n_docs, total = tokens.shape[0], tokens.shape[1] - 1
    plan = _window_plan(total, length, stride)
    if not plan:
        raise ValueError(f"length: {length} is longer than the {total} targets per document")
    losses = torch.zeros(n_docs, total)
    positions = torch.full((n_docs, total), -1, dtype=torch.long)  # target's position in its window; −1: unscored
    _reset_peak_memory(device)
    started = time.perf_counter()
    for begin, end, scored_from in plan:
        size = end - begin
        for rows in torch.arange(n_docs).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // size**2))):
            x = tokens[rows, begin:end].to(device)
            y = tokens[rows, begin + 1:end + 1].to(device)
            window_losses = model.token_losses(x, y, attention=method)
            losses[rows, begin + scored_from:end] = window_losses[:, scored_from:].float().cpu()
            positions[rows, begin + scored_from:end] = torch.arange(scored_from, size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    scored = positions >= 0
    losses, positions = losses[scored], positions[scored]
    beyond = positions >= trained
    edges = np.linspace(0, length, buckets + 1).round().astype(int)
    by_position = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (positions >= lo) & (positions < hi)
        if inside.any():
            by_position.append(PositionBucket(int(lo), int(hi), float(losses[inside].mean()), int(inside.sum())))
    loss = float(losses.mean())
    return Perplexity(
        length=length,
        loss=loss,
        ppl=math.exp(loss) if loss < 700 else math.inf,  # exp overflows a float past ~709
        loss_beyond_train=float(losses[beyond].mean()) if beyond.any() else None,
        tokens=int(losses.numel()),
        seconds=round(seconds, 3),
        peak_memory_mb=round(_peak_memory_mb(device), 1),
        by_position=by_position,
    )


@torch.inference_mode()
def tail_loss(model: Transformer, tokens: Tensor, length: int, targets: int, *,
              attention: "str | AttentionMethod" = "full", batch_size: int = 4) -> tuple[float, int]:
    """Mean loss (and count) of the last `targets` targets of each document of `tokens` (n_docs, T + 1), read
    by one window of `length` tokens ending at the document's end: the same targets at every length."""
    device = next(model.parameters()).device
    method = attention_method(attention) if isinstance(attention, str) else attention
    total = tokens.shape[1] - 1
    if not targets <= length <= total:
        raise ValueError(f"length: a window of {length} tokens cannot score the last {targets} of {total} targets")
    losses = []
    for rows in torch.arange(tokens.shape[0]).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // length**2))):
        x = tokens[rows, total - length:total].to(device)
        y = tokens[rows, total - length + 1:total + 1].to(device)
        losses.append(model.token_losses(x, y, attention=method)[:, -targets:].float().cpu())
    scored = torch.cat(losses)
    return float(scored.mean()), int(scored.numel())


def _window_plan(total: int, length: int, stride: Optional[int]) -> list[tuple[int, int, int]]:
    """(begin, end, first scored offset) of each window over `total` targets. A stride of at least the
    window length means non-overlapping windows (so one stride can serve every evaluation length)."""
    if length < 1:
        raise ValueError(f"length: must be positive, got {length}")
    if stride is not None and stride < 1:
        raise ValueError(f"stride: must be positive, got {stride}")
    if stride is None or stride >= length:
        return [(begin, begin + length, 0) for begin in range(0, total - length + 1, length)]
    plan, scored_until, begin = [], 0, 0
    while scored_until < total:
        end = min(begin + length, total)
        plan.append((begin, end, scored_until - begin))
        scored_until, begin = end, begin + stride
    return plan




# ----------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300)

PASSKEY_INTRO = "\n# The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\n# What is the pass key? The pass key is"


class PasskeyDoesNotFit(ValueError):
    """A passkey prompt of the requested length leaves no room for filler (or the corpus has too little)."""


@dataclass
class PasskeyPrompt:
    tokens: Tensor  # prompt followed by the key's tokens
    answer_start: int  # index of the key's first token (the answer)
    key_position: int  # where the key's sentence begins in the prompt
    key: str


def passkey_prompt(tokenizer, filler: np.ndarray, length: int, depth: float, rng: np.random.Generator) -> PasskeyPrompt:
    """A random 5-digit key in a sentence placed at `depth` (0: start, 1: end) of filler drawn from the
    corpus, then the question; `length` tokens in all, the answer included. The key sentence starts after
    round(depth · n_filler) filler tokens. Raises PasskeyDoesNotFit when `length` leaves no filler."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth: must lie in [0, 1], got {depth}")
    key = str(rng.integers(10000, 100000))
    intro = tokenizer.encode(PASSKEY_INTRO.format(key=key)).ids
    question = tokenizer.encode(PASSKEY_QUESTION).ids
    answer = tokenizer.encode(" " + key).ids
    n_filler = length - len(intro) - len(question) - len(answer)
    if n_filler < 1:
        raise PasskeyDoesNotFit(f"passkey: a prompt of {length} tokens leaves no room for filler (the key "
                                f"sentence, question and answer take {length - n_filler} tokens)")
    if len(filler) < n_filler:
        raise PasskeyDoesNotFit(f"passkey: {n_filler} filler tokens needed, the corpus given has {len(filler)}")
    start = int(rng.integers(0, len(filler) - n_filler + 1))
    chunk = filler[start:start + n_filler].tolist()
    cut = round(depth * n_filler)
    prompt = chunk[:cut] + intro + chunk[cut:] + question
    return PasskeyPrompt(torch.tensor(prompt + answer), len(prompt), cut, key)


@torch.inference_mode()
def passkey_trial(model: Transformer, prompt: PasskeyPrompt,
                  attention: Optional[AttentionMethod] = None) -> tuple[bool, float]:
    """Greedy exact match and the log-probability of the key's tokens, from one teacher-forced pass under
    `attention` (None: full causal attention): greedy decoding reproduces the key's tokens exactly when each is
    the argmax given the ones before. (A greedy output that spells the key with other tokens counts as a miss.)"""
    device = next(model.parameters()).device
    tokens = prompt.tokens.to(device)[None]
    hidden = model.hidden_states(tokens[:, :-1], attention=attention)[0, prompt.answer_start - 1:]
    logits = model.head(hidden).float()  # the LM head on the answer positions only
    answer = tokens[0, prompt.answer_start:]
    log_probs = logits.log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
    return bool((logits.argmax(-1) == answer).all()), float(log_probs.sum())


# ----------------------------------------------------------------------------------------------
# Accuracy of runs trained on a synthetic task (minillm.synthetic)


@dataclass
class TaskScore:
    """One model on one set of task examples: the counts of right answers and tokens, and the answer-only loss."""

    examples: int
    counts: Accuracy
    answer_loss: float  # mean cross-entropy of the answer tokens (nats)
    seconds: float

    def record(self, **setting) -> AccuracyRecord:
        """The AccuracyRecord of this score in `setting` (the model and the evaluation setting)."""
        exact_low, exact_high = self.counts.exact_match_interval()
        token_low, token_high = self.counts.token_accuracy_interval()
        return AccuracyRecord(examples=self.examples, answers=self.counts.answers, tokens=self.counts.tokens,
                              exact_match=self.counts.exact_match, exact_match_low=exact_low,
                              exact_match_high=exact_high, token_accuracy=self.counts.token_accuracy,
                              token_accuracy_low=token_low, token_accuracy_high=token_high,
                              answer_loss=self.answer_loss, seconds=self.seconds, **setting)


@torch.inference_mode()
def task_accuracy(model: Transformer, inputs: Tensor, targets: Tensor, answers: Tensor, *,
                  attention: "str | AttentionMethod" = "full", batch_size: int = 4) -> TaskScore:
    """Exact match, token accuracy and answer-only loss of argmax predictions from one teacher-forced pass over
    examples (n, length) as minillm.synthetic.validation_set gives them; greedy decoding of an answer gives the
    same tokens when each is the argmax given the right ones before it, as the targets are.

    batch_size: examples per forward pass, at most; fewer for long ones, so that a pass never holds more than
    MAX_ATTENTION_PAIRS query-key pairs (see perplexity_at_length). The LM head reads the answer positions only.
    """
    device = next(model.parameters()).device
    method = attention_method(attention) if isinstance(attention, str) else attention
    length = inputs.shape[1]
    counts, loss_sum = Accuracy(0, 0, 0, 0), 0.0
    started = time.perf_counter()
    for rows in torch.arange(len(inputs)).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // length**2))):
        y = targets[rows]
        answer = y != IGNORE
        hidden = model.hidden_states(inputs[rows].to(device), attention=method)[answer.to(device)]
        logits = model.head(hidden).float().cpu()
        predictions = torch.full_like(y, IGNORE)  # only the answer positions are compared
        predictions[answer] = logits.argmax(-1)
        counts = counts + accuracy(predictions, y, answers[rows])
        loss_sum += float(F.cross_entropy(logits, y[answer], reduction="sum"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return TaskScore(len(inputs), counts, loss_sum / counts.tokens if counts.tokens else math.nan, round(seconds, 3))


def effective_length(records: list[AccuracyRecord], threshold: float,
                     min_reference: float = 0.0) -> Optional[int]:
    """The effective length of one run under one (scaling, attention): the longest evaluated length L such that the
    exact match at L and at every shorter evaluated length is at least threshold × the exact match at the training
    length (1x). RULER's notion (Hsieh et al. 2024, arXiv:2404.06654), whose bar is a fixed score (Llama-2-7B's at
    4k), is taken relative to the model's own score at its training length, as tasks differ in difficulty.

    A dip ends it: a length that recovers after a failing one does not count. Lengths not applicable (refused by
    the task, past the encoding's positions) are not evaluated lengths. None when the training length was not
    evaluated, when the exact match there is 0 or below min_reference (a run that did not learn the task has no
    length to keep: at 1 right answer in 256, a bar of 0.9/256 passes every length), or when a length shorter
    than the training length already fails.
    """
    measured = sorted((r for r in records if r.applicable and r.exact_match is not None), key=lambda r: r.length)
    lengths = [r.length for r in measured]
    if len(set(lengths)) < len(lengths):
        raise ValueError("effective_length: takes the records of one run under one scaling and attention, got two "
                         f"at one length ({sorted(n for n in set(lengths) if lengths.count(n) > 1)})")
    reference = next((r.exact_match for r in measured if r.length == r.trained_length), None)
    if not reference or reference < min_reference:
        return None
    bar = threshold * reference
    longest = None
    for r in measured:
        if r.exact_match < bar:
            break
        longest = r.length
    return longest


def effective_lengths(records: list[AccuracyRecord], threshold: float,
                      min_reference: float = 0.0) -> list[EffectiveLengthRecord]:
    """One EffectiveLengthRecord per run under each (scaling, attention) in `records`, in their order."""
    series: dict[tuple, list[AccuracyRecord]] = {}
    for r in records:
        key = (r.model, r.run, r.seed, r.trained_length, r.variant, r.task, r.method, r.attention)
        series.setdefault(key, []).append(r)
    out = []
    for key, group in series.items():
        measured = [r for r in group if r.applicable and r.exact_match is not None]
        reference = next((r.exact_match for r in measured if r.length == r.trained_length), None)
        out.append(EffectiveLengthRecord(*key, threshold=threshold, reference_exact_match=reference,
                                         effective_length=effective_length(group, threshold, min_reference),
                                         longest_length=max((r.length for r in measured), default=None),
                                         min_reference=min_reference))
    return out


# ----------------------------------------------------------------------------------------------
# The evaluation loop


def _passkey(model: Transformer, tokenizer, filler: np.ndarray, lengths: list[int], methods: list[str],
             attention: dict[str, AttentionMethod], config: EvalConfig, info: ModelInfo,
             progress) -> list[PasskeyRecord]:
    """Passkey retrieval at each (scaling, attention, length, depth), every setting on the same prompts (a paired
    comparison); a length too short for the prompt is skipped. attention: the served methods by their names."""
    rng = np.random.default_rng(config.seed)
    trained = model.cfg.context_length
    suffix = "+logn" if config.logn else ""
    prompts: dict[tuple[int, float], list[PasskeyPrompt]] = {}
    for length in lengths:
        try:
            for depth in config.passkey_depths:
                prompts[length, depth] = [passkey_prompt(tokenizer, filler, length, depth, rng)
                                          for _ in range(config.passkey_trials)]
        except PasskeyDoesNotFit as error:
            log.warning("passkey at length %d skipped for %s: %s", length, info.run, error)
            for depth in config.passkey_depths:
                prompts.pop((length, depth), None)
    records = []
    for method in methods:
        for name, served in attention.items():
            for (length, depth), trials_at in prompts.items():
                with scaled_rope(model, scaling_for(method, length, trained, config.scaling_factor)):
                    trials = [passkey_trial(model, prompt, served) for prompt in trials_at]
                records.append(PasskeyRecord(info.model, info.run, info.seed, method, name + suffix, length, depth,
                                             len(trials), sum(t[0] for t in trials) / len(trials),
                                             sum(t[1] for t in trials) / len(trials)))
                progress.update(len(trials))
    return records


def _theory(model: Transformer, info: ModelInfo, lengths: list[int]) -> list[TheoryRecord]:
    rope, trained = model.cfg.rope, model.cfg.context_length
    rotary_dim = rope.rotary_dim or model.cfg.head_dim
    critical, bound = critical_dimension(rotary_dim, rope.theta, trained)
    return [TheoryRecord(info.model, info.run, rotary_dim, rope.theta, trained, critical, bound, length,
                         minimum_base(rotary_dim, length), supported_length(rotary_dim, rope.theta, length))
            for length in lengths]


@dataclass
class Subject:
    """One model to measure and the text it reads: a trained run and its validation documents, or an imported
    model and the documents of `data`, tokenized by its own tokenizer."""

    model: Transformer
    tokenizer: object  # a tokenizers.Tokenizer
    documents: list[np.ndarray]  # token ids of each document, longest first
    info: ModelInfo


def _run_info(run, model: Transformer, seed: int) -> ModelInfo:
    return ModelInfo(model.cfg.label, run.name, seed, model.cfg.context_length, model.cfg.rope.variant,
                     str(run.checkpoint))


def trained_subject(run, device: torch.device) -> Subject:
    """A training run (a minillm.checkpoint.Run): its model, tokenizer and validation documents."""
    from omegaconf import OmegaConf

    from minillm.checkpoint import load_model
    from minillm.config import DataConfig, TokenizerConfig
    from minillm.data import TextDataModule

    model = load_model(run.checkpoint).to(device)
    if not run.config.is_file() or not run.tokenizer.is_file():
        raise ValueError(f"ckpt: {run.folder} lacks config.yaml or tokenizer.json (not a training run folder)")
    run_cfg = OmegaConf.load(run.config)
    data = TextDataModule(DataConfig(**run_cfg.data), TokenizerConfig(path=str(run.tokenizer)),
                          seq_len=model.cfg.context_length, seed=int(run_cfg.seed))
    data.setup("validate")
    return Subject(model, data.tokenizer, data.long_documents(min_tokens=1), _run_info(run, model, int(run_cfg.seed)))


@dataclass
class TaskSubject:
    """A run trained on a synthetic task: its model and the task with the run's knobs."""

    model: Transformer
    task: TaskConfig
    info: ModelInfo


def run_task(run) -> Optional[TaskConfig]:
    """The synthetic task a training run learned (data.path=synthetic), with its knobs; None for a text run (or a
    folder without config.yaml, which trained_subject refuses)."""
    from omegaconf import OmegaConf

    from minillm.config import SYNTHETIC
    from minillm.synthetic import task_config

    if not run.config.is_file():
        return None
    data = OmegaConf.load(run.config).get("data") or {}
    if data.get("path") != SYNTHETIC:
        return None
    name, tasks = data.get("task"), data.get("tasks") or {}
    try:
        return task_config(name, OmegaConf.to_container(tasks[name]) if name in tasks else None)
    except ValueError as error:
        raise ValueError(f"ckpt: {run.config}: {error}") from error


def task_subject(run, task: TaskConfig, device: torch.device) -> TaskSubject:
    """A run trained on `task`: its model, checked to cover the task's vocabulary."""
    from omegaconf import OmegaConf

    from minillm.checkpoint import load_model

    model = load_model(run.checkpoint).to(device)
    if model.cfg.vocab_size < task.vocab_size:
        raise ValueError(f"ckpt: {run.checkpoint} has {model.cfg.vocab_size} tokens, the {task.name} task of its "
                         f"config.yaml {task.vocab_size}: the run folder's config is not the checkpoint's")
    return TaskSubject(model, task, _run_info(run, model, int(OmegaConf.load(run.config).seed)))


def pretrained_subject(source, config: EvalConfig, device: torch.device) -> Subject:
    """An imported model (a minillm.pretrained.PretrainedSource) and the longest documents of config.data."""
    imported = source.load(config.trained_length)
    model = imported.model.to(device)
    info = ModelInfo(source.name, source.name, 0, model.cfg.context_length, model.cfg.rope.variant, source.location)
    return Subject(model, imported.tokenizer, pretrained_documents(imported.tokenizer, config.data), info)


def pretrained_documents(tokenizer, data) -> list[np.ndarray]:
    """The longest data.long_documents documents, longest first, tokenized without special tokens. All of
    data.split (and its validation split, if it has one) is read: nothing here was trained on it by us."""
    from minillm.data import document_texts, load_corpus

    corpus = load_corpus(data)
    texts = document_texts(corpus.train, data) + (document_texts(corpus.val, data) if corpus.val is not None else [])
    longest = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))[:4 * data.long_documents]
    encoded = [np.asarray(e.ids, dtype=np.int64)
               for e in tokenizer.encode_batch([texts[i] for i in longest], add_special_tokens=False)]
    encoded.sort(key=lambda ids: -len(ids))  # longest in characters is not always longest in tokens
    return [ids for ids in encoded if len(ids)][:data.long_documents]


def evaluate_run(run, config: EvalConfig, device: torch.device) -> Results:
    """Every (scaling × attention × length) measurement of one trained run or imported model: task accuracy for
    a run trained on a synthetic task, perplexity and the rest otherwise."""
    from minillm.pretrained import PretrainedSource

    if isinstance(run, PretrainedSource):
        return measure(pretrained_subject(run, config, device), config)
    task = run_task(run)
    if task is not None:
        return measure_accuracy(task_subject(run, task, device), config)
    return measure(trained_subject(run, device), config)


def _lengths(config: EvalConfig, trained: int) -> list[int]:
    return sorted(config.lengths or [trained * m for m in (1, 2, 4, 8, 16)])


def _scalings(config: EvalConfig, model: Transformer, info: ModelInfo) -> list[str]:
    """The scalings to evaluate: config.scalings for a rotary model, "none" for any other."""
    methods = config.scalings if model.cfg.rope.is_rotary else ["none"]
    ignored = sorted(set(config.scalings) - set(methods))
    if ignored:
        log.warning("scalings %s skipped for %s: %s is not rotary", ignored, info.run, model.cfg.rope.variant)
    return methods


def measure(subject: Subject, config: EvalConfig) -> Results:
    """Every (scaling × attention × length) measurement of one model on its documents."""
    from tqdm.auto import tqdm

    model, info = subject.model, subject.info
    trained = model.cfg.context_length
    lengths = _lengths(config, trained)
    longest_documents = subject.documents  # longest first
    longest = len(longest_documents[0]) - 1 if longest_documents else 0  # targets in the longest document
    documents = [d for d in longest_documents if len(d) >= min(lengths) + 1]
    usable = [n for n in lengths if n <= longest]
    for n in sorted(set(lengths) - set(usable)):
        log.warning("length %d skipped for %s: the longest document has %d tokens", n, info.run, longest + 1)
    if not usable:
        raise ValueError(f"lengths: none of {lengths} fits the documents of {info.run} "
                         f"(longest: {longest + 1} tokens)")
    tokens = evaluation_tokens(documents, max(usable), config.max_documents)
    methods = _scalings(config, model, info)
    limit = model.position.max_length  # the encoding's own limit (learned positions: the training length)
    served, refused = served_methods(config, model.cfg)
    for name, reason in refused.items():
        log.warning("attention %s skipped for %s: %s", name, info.run, reason)
    suffix = "+logn" if config.logn else ""
    results = Results()
    plan = [(m, a, n) for m in methods for a in config.attention for n in usable]
    done: dict[tuple, tuple[Perplexity, Optional[tuple[float, int]]]] = {}
    with log_n_queries(model, config.logn):
        for method, attention, length in tqdm(plan, desc=f"perplexity {info.run}", unit="length"):
            setting = dict(vars(info), method=method, attention=attention + suffix, stride=config.stride)
            if attention in refused or (limit is not None and length > limit):
                note = refused.get(attention) or f"{info.variant} positions stop at {limit}"
                results.perplexity.append(PerplexityRecord(length=length, loss=None, ppl=None, applicable=False,
                                                           note=note, **setting))
                continue
            scaling = scaling_for(method, length, trained, config.scaling_factor)
            with scaled_rope(model, scaling):
                # A scaling that leaves this length's frequencies as another left them (every static one at
                # factor 1, i.e. up to the training length) computes the same numbers: reuse them.
                key = (attention, length, rotary_key(model, length))
                if key not in done:
                    measured = perplexity_at_length(model, tokens, length, attention=served[attention],
                                                    stride=config.stride, batch_size=config.batch_size,
                                                    buckets=config.buckets)
                    tail = None
                    if config.tail_loss and length >= trained:  # the same last `trained` targets at every length
                        tail = tail_loss(model, tokens, length, trained, attention=served[attention],
                                         batch_size=config.batch_size)
                    done[key] = measured, tail
                measured, tail = done[key]
            if tail is not None:
                results.tail.append(TailLossRecord(info.model, info.run, info.seed, trained, method,
                                                   attention + suffix, length, trained, *tail))
            results.perplexity.append(PerplexityRecord(**vars(measured), factor=scaling.factor, **setting))
    if config.passkey_trials:
        passkey_lengths = [n for n in usable if limit is None or n <= limit]
        total = len(methods) * len(served) * len(passkey_lengths) * len(config.passkey_depths) * config.passkey_trials
        with tqdm(total=total, desc=f"passkey {info.run}", unit="trial") as progress, \
                log_n_queries(model, config.logn):
            results.passkey = _passkey(model, subject.tokenizer, np.concatenate(documents), passkey_lengths, methods,
                                       served, config, info, progress)
    if model.cfg.rope.is_rotary:
        results.theory = _theory(model, info, usable)
    return results


def measure_accuracy(subject: TaskSubject, config: EvalConfig) -> Results:
    """Every (scaling × attention × length) accuracy of one task-trained model on config.task_examples examples of
    the task's test stream (never seen in training or validation), and its effective lengths. A length the task
    refuses, or the encoding cannot reach, gives a record that does not apply, with the reason as its note."""
    from tqdm.auto import tqdm

    model, task, info = subject.model, subject.task, subject.info
    trained = model.cfg.context_length
    lengths = _lengths(config, trained)
    methods = _scalings(config, model, info)
    limit = model.position.max_length  # the encoding's own limit (learned positions: the training length)
    served, refused = served_methods(config, model.cfg)
    for name, reason in refused.items():
        log.warning("attention %s skipped for %s: %s", name, info.run, reason)
    unreachable = {}  # length -> why it cannot be measured
    for length in lengths:
        try:
            task.check_length(length)
        except ValueError as error:  # names the knob that bounds it
            unreachable[length] = str(error)
        if limit is not None and length > limit:
            unreachable[length] = f"{info.variant} positions stop at {limit}"
    suffix = "+logn" if config.logn else ""
    results = Results()
    examples: dict[int, tuple[Tensor, ...]] = {}  # length -> the test examples, drawn once for every setting
    done: dict[tuple, TaskScore] = {}
    plan = [(m, a, n) for m in methods for a in config.attention for n in lengths]
    with log_n_queries(model, config.logn):
        for method, attention, length in tqdm(plan, desc=f"accuracy {info.run}", unit="length"):
            setting = dict(model=info.model, run=info.run, seed=info.seed, trained_length=trained,
                           variant=info.variant, task=task.name, method=method, attention=attention + suffix,
                           length=length)
            note = refused.get(attention) or unreachable.get(length)
            if note is not None:
                results.accuracy.append(AccuracyRecord(applicable=False, note=note, **setting))
                continue
            with scaled_rope(model, scaling_for(method, length, trained, config.scaling_factor)):
                key = (attention, length, rotary_key(model, length))  # the same frequencies: the same numbers
                if key not in done:
                    if length not in examples:
                        examples[length] = validation_set(task, length, config.task_examples, config.seed,
                                                          split="test").tensors
                    done[key] = task_accuracy(model, *examples[length], attention=served[attention],
                                              batch_size=config.batch_size)
            results.accuracy.append(done[key].record(**setting))
    results.effective_length = effective_lengths(results.accuracy, config.effective_threshold,
                                                 config.effective_min_exact_match)
    if model.cfg.rope.is_rotary:
        results.theory = _theory(model, info, [n for n in lengths if n not in unreachable])
    return results


def served_methods(config: EvalConfig, model_cfg) -> tuple[dict[str, AttentionMethod], dict[str, str]]:
    """The requested attention methods this model can serve (name -> method), and why the others cannot."""
    served, refused = {}, {}
    for name in config.attention:
        method = config.method(name)
        try:
            check_encoding(method, model_cfg.rope, model_cfg.context_length)
            served[name] = method
        except ValueError as error:
            refused[name] = str(error)
    return served, refused


def model_sources(config: EvalConfig) -> list:
    """What config.ckpt names: training runs (minillm.checkpoint.Run) and models to import
    (minillm.pretrained.PretrainedSource), in order. In a list, a glob that matches nothing is skipped with a
    warning (a study's list names every encoding, and a partial sweep lacks some); when none matches, the first
    such glob is the error."""
    from minillm.checkpoint import CheckpointError, find_runs
    from minillm.pretrained import PretrainedSource, is_pretrained

    sources, unmatched = [], []
    for path in config.checkpoints:
        if is_pretrained(path):
            sources.append(PretrainedSource.parse(path))
            continue
        try:
            sources.extend(find_runs(path))
        except CheckpointError as error:
            if not str(error).startswith("ckpt: nothing matches") or len(config.checkpoints) == 1:
                raise
            unmatched.append(error)
    if unmatched and not sources:
        raise unmatched[0]
    for error in unmatched:
        log.warning("%s: skipped", error)
    return sources


def source_config(source, config: EvalConfig):
    """The ModelConfig a source will be measured with, read without loading its weights."""
    from minillm.checkpoint import run_model_config
    from minillm.pretrained import PretrainedSource

    if isinstance(source, PretrainedSource):
        return source.config(config.trained_length)
    if config.trained_length is not None:
        log.warning("trained_length=%d ignored for %s: a trained run's length is the one it was trained at",
                    config.trained_length, source.name)
    return run_model_config(source)


def evaluate(config: EvalConfig, device: torch.device) -> Results:
    """Every (checkpoint × scaling × attention × length) measurement of the checkpoints config names: each run
    its own kind (task accuracy for runs trained on a synthetic task, perplexity and the rest otherwise).

    Before measuring anything: an attention method that none of the runs can serve (or whose knobs fit none of
    their training lengths) is an error naming it; one that some runs cannot serve is skipped for those."""
    sources = [(run, source_config(run, config)) for run in model_sources(config)]
    if config.logn:  # a model trained with its own query temperature is skipped; with every one so, refused
        scaled = [(run, cfg) for run, cfg in sources if cfg.attn_temperature != "none"]
        if sources and len(scaled) == len(sources):
            raise ValueError(f"logn: every run already scales its queries (model.attn_temperature="
                             f"{scaled[0][1].attn_temperature!r} in {scaled[0][0].name})")
        for run, cfg in scaled:
            log.warning("logn: %s skipped: it already scales its queries (model.attn_temperature=%r)",
                        run.name, cfg.attn_temperature)
        sources = [(run, cfg) for run, cfg in sources if cfg.attn_temperature == "none"]
    runs, configs = [run for run, _ in sources], [cfg for _, cfg in sources]
    refusals = [served_methods(config, cfg)[1] for cfg in configs]
    for name in config.attention:
        if runs and all(name in refused for refused in refusals):
            raise ValueError(refusals[0][name])
    dtype, reason = eval_dtype(config.precision, device)
    results = Results(precision=str(dtype).removeprefix("torch."), precision_reason=reason)
    # bf16: the matmuls under autocast; losses, norms, softmax statistics and rotary angles stay float32.
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for run in runs:
            results.extend(evaluate_run(run, config, device))
    return results
