"""Perplexity and loss by position over windows of a length: the function, its record and its measurement."""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from minillm.eval.grouping import length_table
from minillm.eval.measurement import Measurement, Reading, Table, register_measurement
from minillm.eval.records import SETTING_COLUMNS, Record, Results, Setting
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, attention_method
from minillm.positions.rotary import RotaryEmbedding
from minillm.positions.scaling import SCALINGS, Scaling

# ----------------------------------------------------------------------------------------------
# What perplexity_at_length measures, and its record


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
class PerplexityRecord(Record):
    """A Perplexity in its setting; applicable False (and the measured fields None) where the setting cannot be
    measured: the encoding is undefined at this length, or the model cannot serve the attention method (see note)."""

    nested = ("by_position",)

    length: int
    loss: Optional[float]
    ppl: Optional[float]
    loss_beyond_train: Optional[float] = None
    tokens: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    by_position: list[PositionBucket] = field(default_factory=list)
    applicable: bool = True
    note: Optional[str] = None

    @classmethod
    def from_row(cls, row: dict) -> "PerplexityRecord":
        return super().from_row({**row, "by_position": [PositionBucket(**b) for b in row.get("by_position", [])]})


# ----------------------------------------------------------------------------------------------
# Inference-time frequency scaling of a trained rotary model (no retraining)


def scaling_for(method: str, length: int, trained_length: int, given: Optional[float],
                searched: Optional[Scaling] = None) -> Scaling:
    """The scaling `method` for an evaluation at `length`: factor = given, else the method's own rule
    (length / trained length; dynamic NTK: 1). A scaling whose factors are searched per model (longrope) is
    `searched` as it is, at every length (its factor is the one searched for; its switch follows the length)."""
    cls = SCALINGS[method]
    if cls.name == "none":
        return cls()
    if not cls.from_factor:
        if searched is None or searched.name != method:
            raise ValueError(f"scalings: {method} needs factors searched for the model "
                             f"(scripts/longrope_search.py)")
        return searched
    factor = given if given is not None else cls().factor_for(length, trained_length)
    return cls(factor=factor, original_max_position=trained_length)


def rotary_key(model: Transformer, scaling: Scaling, length: int) -> Optional[tuple]:
    """What a window of `length` tokens is rotated with under `scaling` (frequencies and temperature, from the
    scaling's own formula), hashable; None for a model without rotary frequencies. Equal keys, equal
    measurements."""
    position = model.position.rescaled(scaling)
    if isinstance(position, RotaryEmbedding):
        inv_freq, attention_factor = position.scaling.frequencies(position.theta, position.rotary_dim, length)
        return inv_freq.numpy().tobytes(), float(attention_factor)
    if not model.cfg.rope.is_rotary:
        return None
    # Other rotary encodings (PoPE, FoPE) turn by the scaling's frequencies over their spectrum: equal frequencies
    # there, equal models. "none" reads the encoding as built, with the scaling it was trained with.
    dim, theta = model.cfg.rope.rotary_spectrum(model.cfg.head_dim)
    used = model.cfg.rope_scaling if scaling.name == "none" else scaling
    inv_freq, attention_factor = used.frequencies(theta, dim, length)
    return inv_freq.numpy().tobytes(), float(attention_factor)


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
                         scaling: Optional[Scaling] = None, logn: bool = False, stride: Optional[int] = None,
                         batch_size: int = 4, buckets: int = 16) -> "Perplexity":
    """Mean loss over the targets of `tokens` (n_docs, T + 1) scored with windows of `length` tokens, the model
    read under `attention`, `scaling` and `logn` (Transformer.hidden_states).

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
            window_losses = model.token_losses(x, y, attention=method, scaling=scaling, logn=logn)
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
# The measurement


@register_measurement("perplexity")
class PerplexityMeasurement(Measurement):
    """Perplexity and loss by position (perplexity_at_length) of a model's documents at each setting: one record per
    setting, not applicable (with the reason) where the model cannot be read so."""

    record = PerplexityRecord
    csv = "results.csv"

    def __init__(self, subject, plan, config):
        super().__init__(subject, plan, config)
        # the same targets at every length: the first max(lengths) + 1 tokens of each document that long
        self.tokens = evaluation_tokens(subject.documents, max(plan.lengths), config.max_documents)

    def measure(self, reading: Reading) -> list[PerplexityRecord]:
        config = self.config
        measured = perplexity_at_length(reading.model, self.tokens, reading.length, **reading.read,
                                        stride=config.stride, batch_size=config.batch_size, buckets=config.buckets)
        return [PerplexityRecord(reading.setting, **vars(measured))]

    def does_not_apply(self, setting: Setting, length: int, note: str) -> list[PerplexityRecord]:
        return [PerplexityRecord(setting, length, None, None, applicable=False, note=note)]

    @classmethod
    def shown(cls, results: Results) -> bool:
        """Every evaluation with text in it (or with nothing: its empty table says so) has the perplexity section;
        one of runs trained on a synthetic task only has none."""
        return bool(results.of(cls.record)) or all(r.setting.task is None for r in results.all())

    @classmethod
    def tables(cls, results: Results) -> list[Table]:
        records = results.of(cls.record)
        positions = [(r, {**r.setting.to_row(), "length": r.length, **vars(bucket)})
                     for r in records for bucket in r.by_position]
        return [Table("perplexity", cls.csv, cls.record.columns(), [(r, r.csv_row()) for r in records],
                      plot=("ppl_vs_length", "length", "ppl", "Perplexity against length")),
                Table("loss_by_position", "loss_by_position.csv",
                      SETTING_COLUMNS + ("length", "position_start", "position_end", "loss", "tokens"), positions,
                      plot=("loss_vs_position", "position_start", "loss", "Loss against position"))]

    @classmethod
    def section(cls, results: Results) -> Optional[str]:
        if not cls.shown(results):
            return None
        return "## Perplexity against evaluation length\n\n" + perplexity_table(results.of(cls.record))

    @classmethod
    def figures(cls, results: Results, out_dir: Path) -> list[Path]:
        from minillm.eval.plots import plot

        return plot(results.of(cls.record), out_dir) if cls.shown(results) else []


def perplexity_table(records: list[PerplexityRecord]) -> str:
    """Markdown: perplexity per length (mean ± std over seeds); n/a where the model cannot run that long."""
    return length_table(records, lambda r: r.ppl if r.applicable else None, "ppl @ {}")
