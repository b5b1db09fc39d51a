"""RoPE-base theory: which lengths a rotary base supports (Liu et al. 2023; Men et al. 2024), and its record beside
the measurements."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from minillm.eval.grouping import markdown_table
from minillm.eval.measurement import Measurement, register_measurement
from minillm.eval.records import Record, Results
from minillm.positions.scaling import rotary_inv_freq


def critical_dimension(rotary_dim: int, theta: float, trained_length: int) -> tuple[int, float]:
    """Liu et al. 2023 (arXiv:2310.05209, eq. 8): d_extra = 2⌈(d/2)·log_θ(T_train / 2π)⌉ dimensions complete a
    full period within the training length; the others never saw a whole turn. Extrapolation is expected
    to hold up to T_extra = 2π·θ^(d_extra/d) tokens. (LLaMA 2: d = 128, θ = 1e4, T = 4096 -> 92.)"""
    d_extra = 2 * math.ceil(rotary_dim / 2 * math.log(trained_length / (2 * math.pi)) / math.log(theta))
    d_extra = min(max(d_extra, 0), rotary_dim)
    return d_extra, 2 * math.pi * theta ** (d_extra / rotary_dim)


def _decay_sums(inv_freq: Tensor, distances: Tensor) -> Tensor:
    """B(m) = Σ_i cos(m·θ_i) for each row of inv_freq (bases, d/2) and each distance: (bases, distances)."""
    return torch.cos(distances[None, :, None] * inv_freq[:, None, :]).sum(-1)


def supported_length(rotary_dim: int, theta: float, limit: int) -> int:
    """Men et al. 2024 (arXiv:2405.14591): the longest L ≤ limit with B(m) = Σ_i cos(m·θ^(−2i/d)) ≥ 0 for
    every distance m ≤ L. B(m) ∝ how much more attention a token similar to the query gets than a random
    one at distance m; where it turns negative, the base no longer supports that context length."""
    inv_freq = rotary_inv_freq(theta, rotary_dim)[None]
    for distances in torch.arange(1, limit + 1, dtype=torch.float64).split(8192):  # B(0) = d/2 > 0
        negative = (_decay_sums(inv_freq, distances)[0] < 0).nonzero()
        if len(negative):
            return int(distances[negative[0, 0]]) - 1
    return limit


MIN_BASE_STEP = 1e-3  # relative spacing of the bases minimum_base tries


@functools.lru_cache(maxsize=None)
def minimum_base(rotary_dim: int, length: int) -> float:
    """Men et al. 2024 (arXiv:2405.14591, Table 1): the smallest base θ with B(m) ≥ 0 for every distance
    m ≤ length (see supported_length), over bases 0.1% apart from 2 to 1e12; inf when none holds.

    The bases that hold do not form an interval. Below a threshold they come in narrow windows between
    bases that fail (d = 128, 2048 tokens: 1.161e4–1.166e4 holds, 1.2e4 fails, 1.53e4–1.68e4 holds, ...),
    so this is the start of the first window the grid meets, and a base above it may still fail: ask
    supported_length about a given base. For d = 128 it gives 4.3e3 (1024 tokens), 1.16e4 (2048),
    2.70e4 (4096), 8.38e4 (8192), 2.34e5 (16384), 6.30e5 (32768), 2.09e6 (65536); the paper lists 4.3e3,
    1.6e4, 2.7e4, 8.4e4, 3.1e5, 6.4e5, 2.1e6. Its 2k and 16k values lie in later windows (both hold):
    a coarser search over bases, which steps over the first windows, finds those.

    Fast: bases are screened in float32, rejected only where B < −(a bound on float32's error). The
    distances go every 16th first (a failing base is usually negative over a stretch of distances, so
    most fail within the first pass), in chunks that grow as bases drop out; every distance is checked
    before a base survives, and the first survivor is confirmed in float64.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    distances = torch.arange(1, length + 1, dtype=torch.float32)
    distances = torch.cat([distances[offset::16] for offset in range(16)])  # a permutation: all are checked
    # Each float32 term errs by at most two roundings of an angle ≤ length (relative 2^-24 each), plus cos's own.
    margin = len(exponents) * (2 * length * 2.0**-24 + 1e-4)
    log_bases = torch.arange(math.log(2.0), math.log(1e12), math.log1p(MIN_BASE_STEP), dtype=torch.float64)
    for batch in log_bases.split(256):
        inv_freq = torch.exp(-batch[:, None] * exponents[None, :]).float()
        alive, start, chunk = torch.arange(len(batch)), 0, 64
        while start < length and len(alive):
            sums = _decay_sums(inv_freq[alive], distances[start:start + chunk])
            alive = alive[(sums >= -margin).all(1)]
            start += chunk
            chunk = max(64, min(2 * chunk, (1 << 20) // max(len(alive) * len(exponents), 1)))
        for index in alive.tolist():
            base = math.exp(float(batch[index]))
            if supported_length(rotary_dim, base, length) >= length:
                return base
    return math.inf


# ----------------------------------------------------------------------------------------------
# Beside the measurements


@dataclass
class TheoryRecord(Record):
    """What the RoPE-base literature predicts for one rotary model (its setting as trained) at one length."""

    length: int
    rotary_dim: int
    theta: float
    critical_dim: int  # Liu et al. 2023
    extrapolation_bound: float  # Liu et al. 2023: T_extra
    min_base: float  # Men et al. 2024
    supported_length: int  # Men et al. 2024: the longest length this base supports, up to `length`


@register_measurement("theory")
class TheoryMeasurement(Measurement):
    """The critical dimension and the base bound of a rotary model at every length the plan reaches."""

    record = TheoryRecord
    kinds = ("text", "task")

    @classmethod
    def applies(cls, subject, config) -> bool:
        return subject.model.cfg.rope.is_rotary

    def derive(self, results: Results) -> list[TheoryRecord]:
        cfg = self.subject.model.cfg
        # the channels that turn and their base as built (p-RoPE: a part of the head; PoPE: twice the head)
        rotary_dim, theta = cfg.rope.rotary_spectrum(cfg.head_dim)
        critical, bound = critical_dimension(rotary_dim, theta, cfg.context_length)
        return [TheoryRecord(self.subject.setting, length, rotary_dim, theta, critical, bound,
                             minimum_base(rotary_dim, length), supported_length(rotary_dim, theta, length))
                for length in self.plan.reachable]

    @classmethod
    def heading(cls, records: list[TheoryRecord]) -> str:
        return "RoPE theory beside the measurement"

    @classmethod
    def table(cls, records: list[TheoryRecord], results: Results) -> str:
        return theory_table(records)


def theory_table(records: list[TheoryRecord]) -> str:
    """Markdown: the critical dimension (Liu et al. 2023) and the base bound (Men et al. 2024) per model and
    length, one row for all seeds of a model. predicted: 'ok' when the model's base keeps B(m) ≥ 0 up to the
    length."""
    if not records:
        return ""
    header = ["model", "rotary dim", "θ", "critical dim (Liu 2023)", "T_extra", "eval length", "min base (Men 2024)",
              "base supports (Men 2024)", "predicted"]
    rows, seen = [], set()
    for t in records:
        model = (t.setting.model, t.rotary_dim, t.theta, t.setting.trained_length, t.length)
        if model in seen:
            continue
        seen.add(model)
        rows.append([t.setting.model, str(t.rotary_dim), f"{t.theta:g}", str(t.critical_dim),
                     f"{t.extrapolation_bound:.0f}", str(t.length), f"{t.min_base:.3g}", str(t.supported_length),
                     "ok" if t.supported_length >= t.length else "base too small"])
    return markdown_table(header, rows)
