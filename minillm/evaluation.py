"""Extrapolation measurements: perplexity and loss against length and position, passkey retrieval, RoPE theory.

Everything here returns plain records (dicts); minillm.report turns them into tables and plots.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import math
import resource
import time
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from minillm.config import scaling_config
from minillm.model import Transformer
from minillm.rope import RotaryEmbedding

ATTENTION_MODES = ("full", "sliding", "blockwise")


# ----------------------------------------------------------------------------------------------
# Attention patterns at evaluation time (bool masks: True = may attend)


def attention_mask(mode: str, length: int, window: int, device: torch.device) -> Optional[Tensor]:
    """full: plain causal (None, SDPA's own flag). sliding: each query sees the last `window` keys.
    blockwise (Sun et al. 2022, arXiv:2212.10554, sec. 3.3): blocks of window/2 tokens attend causally
    to their own block and the one before, so no query sees keys more than `window` positions back."""
    if mode == "full" or length <= window and mode == "sliding":
        return None
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    causal = key <= query
    if mode == "sliding":
        return causal & (query - key < window)
    if mode == "blockwise":
        block = max(window // 2, 1)
        return causal & (query // block - key // block <= 1)
    raise ValueError(f"attention: got {mode!r}, expected one of {list(ATTENTION_MODES)}")


# ----------------------------------------------------------------------------------------------
# Inference-time frequency scaling of a trained rotary model (no retraining)


@contextlib.contextmanager
def scaled_rope(model: Transformer, method: str, factor: float) -> Iterator[Transformer]:
    """Temporarily give a rotary model another frequency scaling; its weights are untouched."""
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
    """Non-overlapping windows: inputs (n, length) and targets (n, length) covering tokens[:, 1:]."""
    n_docs, total = tokens.shape[0], tokens.shape[1] - 1
    per_doc = total // length
    starts = torch.arange(per_doc) * length
    index = starts[:, None] + torch.arange(length + 1)[None, :]
    chunks = tokens[:, index].reshape(n_docs * per_doc, length + 1)
    return chunks[:, :-1], chunks[:, 1:]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def perplexity_at_length(model: Transformer, tokens: Tensor, length: int, *, attention: str = "full",
                         stride: Optional[int] = None, batch_size: int = 4, buckets: int = 16) -> dict:
    """Mean loss over every target in `tokens` with windows of `length` tokens.

    stride=None: non-overlapping windows (each token sees its window's past). stride=S: the sliding
    protocol of the ALiBi paper (Press et al. 2021, sec. 4.2): windows advance by S and only their last S
    targets are scored, so every scored token sees at least length − S tokens of context.
    """
    device = next(model.parameters()).device
    trained = model.cfg.context_length
    mask = attention_mask(attention, length, trained, device)
    losses = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    positions = torch.zeros_like(losses, dtype=torch.long)  # each target's position inside its window
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for begin, end, scored_from in _window_plan(tokens.shape[1] - 1, length, stride):
        for rows in torch.arange(tokens.shape[0]).split(batch_size):
            x = tokens[rows, begin:end].to(device)
            y = tokens[rows, begin + 1:end + 1].to(device)
            window_losses = model.token_losses(x, y, attention_mask=mask if end - begin == length else
                                               attention_mask(attention, end - begin, trained, device))
            losses[rows, begin + scored_from:end] = window_losses[:, scored_from:].float().cpu()
            positions[rows, begin + scored_from:end] = torch.arange(scored_from, end - begin)
    seconds = time.perf_counter() - started
    beyond = positions >= trained
    edges = np.linspace(0, length, buckets + 1).round().astype(int)
    by_position = [{"position_start": int(lo), "position_end": int(hi),
                    "loss": float(losses[(positions >= lo) & (positions < hi)].mean())}
                   for lo, hi in zip(edges[:-1], edges[1:]) if ((positions >= lo) & (positions < hi)).any()]
    loss = float(losses.mean())
    return {
        "length": length,
        "loss": loss,
        "ppl": math.exp(loss),
        "loss_beyond_train": float(losses[beyond].mean()) if beyond.any() else None,
        "tokens": int(losses.numel()),
        "seconds": round(seconds, 3),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else _peak_rss_mb(), 1),
        "by_position": by_position,
    }


def _window_plan(total: int, length: int, stride: Optional[int]) -> list[tuple[int, int, int]]:
    """(begin, end, first scored offset) of each window over `total` targets."""
    if stride is None:
        return [(begin, begin + length, 0) for begin in range(0, total - length + 1, length)]
    if not 0 < stride <= length:
        raise ValueError(f"stride: must be in [1, length={length}], got {stride}")
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


@dataclasses.dataclass
class PasskeyPrompt:
    tokens: Tensor  # prompt followed by the key's tokens
    answer_start: int  # index of the key's first token (the answer)
    key_position: int  # where the key's sentence begins in the prompt
    key: str


def passkey_prompt(tokenizer, filler: np.ndarray, length: int, depth: float, rng: np.random.Generator) -> PasskeyPrompt:
    """A random 5-digit key in a sentence placed at `depth` (0: start, 1: end) of filler drawn from the
    corpus, then the question; `length` tokens in all, the answer included."""
    key = str(rng.integers(10000, 100000))
    intro = tokenizer.encode(PASSKEY_INTRO.format(key=key)).ids
    question = tokenizer.encode(PASSKEY_QUESTION).ids
    answer = tokenizer.encode(" " + key).ids
    n_filler = length - len(intro) - len(question) - len(answer)
    if n_filler < 1 or len(filler) < n_filler:
        raise ValueError(f"passkey: length {length} leaves no room for filler or the corpus has too little")
    start = int(rng.integers(0, len(filler) - n_filler + 1))
    chunk = filler[start:start + n_filler].tolist()
    cut = round(depth * n_filler)
    prompt = chunk[:cut] + intro + chunk[cut:] + question
    return PasskeyPrompt(torch.tensor(prompt + answer), len(prompt), cut, key)


@torch.inference_mode()
def passkey_trial(model: Transformer, prompt: PasskeyPrompt) -> tuple[bool, float]:
    """Greedy exact match and the log-probability of the key's tokens, from one teacher-forced pass:
    greedy decoding reproduces the key exactly when every key token is the argmax given the ones before."""
    device = next(model.parameters()).device
    tokens = prompt.tokens.to(device)[None]
    logits = model(tokens[:, :-1])[0, prompt.answer_start - 1:].float()
    answer = tokens[0, prompt.answer_start:]
    log_probs = logits.log_softmax(-1).gather(-1, answer[:, None]).squeeze(-1)
    return bool((logits.argmax(-1) == answer).all()), float(log_probs.sum())


# ----------------------------------------------------------------------------------------------
# Theory from the RoPE-base literature


def critical_dimension(rotary_dim: int, theta: float, trained_length: int) -> tuple[int, float]:
    """Liu et al. 2023 (arXiv:2310.05209, eq. 8): d_extra = 2⌈(d/2)·log_θ(T_train / 2π)⌉ dimensions complete a
    full period within the training length; the others never saw a whole turn. Extrapolation is expected
    to hold up to T_extra = 2π·θ^(d_extra/d) tokens."""
    d_extra = 2 * math.ceil(rotary_dim / 2 * math.log(trained_length / (2 * math.pi)) / math.log(theta))
    d_extra = min(max(d_extra, 0), rotary_dim)
    return d_extra, 2 * math.pi * theta ** (d_extra / rotary_dim)


@functools.lru_cache(maxsize=None)
def minimum_base(rotary_dim: int, length: int) -> float:
    """Men et al. 2024 (arXiv:2405.14591, eq. 10): the smallest base θ with
    B(m) = Σ_i cos(m·θ^(−2i/d)) ≥ 0 for every distance m ≤ length. B is not monotone in θ, so a scan
    over a log grid finds the first θ that holds, then bisection sharpens it against the point before."""
    distances = torch.arange(length + 1, dtype=torch.float64)[:, None]
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim

    def holds(log_theta: float) -> bool:
        return bool(torch.cos(distances * torch.exp(-log_theta * exponents)).sum(-1).min() >= 0)

    grid = np.linspace(math.log(2.0), math.log(1e12), 160)
    first = next((i for i, log_theta in enumerate(grid) if holds(log_theta)), None)
    if first is None:
        return math.inf
    if first == 0:
        return 2.0
    low, high = grid[first - 1], grid[first]
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (low, middle) if holds(middle) else (middle, high)
    return math.exp(high)
