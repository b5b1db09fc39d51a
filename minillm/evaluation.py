"""Extrapolation measurements: perplexity and loss against length and position, passkey retrieval, RoPE theory.

Everything here returns plain records (dicts); minillm.report turns them into tables and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from minillm.config import scaling_config
from minillm.model import Transformer
from minillm.rope import RotaryEmbedding, rotary_inv_freq

ATTENTION_MODES = ("full", "sliding", "blockwise")


# ----------------------------------------------------------------------------------------------
# Attention patterns at evaluation time (bool masks: True = may attend)


def attention_mask(mode: str, length: int, window: int, device: torch.device) -> Optional[Tensor]:
    """full: plain causal. sliding: each query sees the last `window` keys, itself included.
    blockwise (Sun et al. 2022, arXiv:2212.10554, sec. 3.3): blocks of window/2 tokens attend causally
    to their own block and the one before, so no query sees keys `window` or more positions back.
    None wherever the pattern is plain causal attention, so SDPA keeps its fused causal kernels."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention: got {mode!r}, expected one of {list(ATTENTION_MODES)}")
    block = max(window // 2, 1)
    if mode == "full" or (mode == "sliding" and length <= window) or (mode == "blockwise" and length <= 2 * block):
        return None
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    causal = key <= query
    if mode == "sliding":
        return causal & (query - key < window)
    return causal & (query // block - key // block <= 1)


# ----------------------------------------------------------------------------------------------
# Inference-time frequency scaling of a trained rotary model (no retraining)


@contextlib.contextmanager
def scaled_rope(model: Transformer, method: str, factor: float) -> Iterator[Transformer]:
    """Temporarily give a rotary model another frequency scaling; its weights are untouched. "none" keeps
    the encoding the model was built with (its training-time scaling, if it had one)."""
    original = model.position
    if method != "none":
        if not isinstance(original, RotaryEmbedding):
            raise ValueError(f"scaling: {method!r} needs a rotary model, this one uses {model.cfg.rope.variant!r}")
        params = {"type": method, "factor": factor, "original_max_position": model.cfg.context_length}
        cfg = dataclasses.replace(model.cfg, rope_scaling=scaling_config(params))
        model.position = RotaryEmbedding.from_config(cfg).to(original.inv_freq.device)
    try:
        yield model
    finally:
        model.position = original


def scaling_factor(method: str, length: int, trained_length: int, given: Optional[float]) -> float:
    """factor = eval length / trained length unless given. Dynamic NTK gets 1: its base already follows
    the length, base·(L/L0)^(d/(d−2)), and a second factor would scale twice."""
    if given is not None:
        return given
    if method == "dynamic_ntk":
        return 1.0
    return max(1.0, length / trained_length)


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
def perplexity_at_length(model: Transformer, tokens: Tensor, length: int, *, attention: str = "full",
                         stride: Optional[int] = None, batch_size: int = 4, buckets: int = 16) -> dict:
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
    n_docs, total = tokens.shape[0], tokens.shape[1] - 1
    plan = _window_plan(total, length, stride)
    if not plan:
        raise ValueError(f"length: {length} is longer than the {total} targets per document")
    losses = torch.zeros(n_docs, total)
    positions = torch.full((n_docs, total), -1, dtype=torch.long)  # target's position in its window; −1: unscored
    masks: dict[int, Optional[Tensor]] = {}  # one pattern per window size (a stride's last window is shorter)
    _reset_peak_memory(device)
    started = time.perf_counter()
    for begin, end, scored_from in plan:
        size = end - begin
        if size not in masks:
            masks[size] = attention_mask(attention, size, trained, device)
        for rows in torch.arange(n_docs).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // size**2))):
            x = tokens[rows, begin:end].to(device)
            y = tokens[rows, begin + 1:end + 1].to(device)
            window_losses = model.token_losses(x, y, attention_mask=masks[size])
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
            by_position.append({"position_start": int(lo), "position_end": int(hi),
                                "loss": float(losses[inside].mean()), "tokens": int(inside.sum())})
    loss = float(losses.mean())
    return {
        "length": length,
        "loss": loss,
        "ppl": math.exp(loss) if loss < 700 else math.inf,  # exp overflows a float past ~709
        "loss_beyond_train": float(losses[beyond].mean()) if beyond.any() else None,
        "tokens": int(losses.numel()),
        "seconds": round(seconds, 3),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "by_position": by_position,
    }


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


@dataclasses.dataclass
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
def passkey_trial(model: Transformer, prompt: PasskeyPrompt) -> tuple[bool, float]:
    """Greedy exact match and the log-probability of the key's tokens, from one teacher-forced pass:
    greedy decoding reproduces the key's tokens exactly when each is the argmax given the ones before.
    (A greedy output that spells the key with other tokens counts as a miss.)"""
    device = next(model.parameters()).device
    tokens = prompt.tokens.to(device)[None]
    hidden = model.hidden_states(tokens[:, :-1])[0, prompt.answer_start - 1:]
    logits = model.head(hidden).float()  # the LM head on the answer positions only
    answer = tokens[0, prompt.answer_start:]
    log_probs = logits.log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
    return bool((logits.argmax(-1) == answer).all()), float(log_probs.sum())


# ----------------------------------------------------------------------------------------------
# Theory from the RoPE-base literature


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
