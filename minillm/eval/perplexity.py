"""Perplexity and loss by position over windows of a length, and the loss on fixed last tokens against context."""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from minillm.eval.records import Perplexity, PositionBucket
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, attention_method
from minillm.positions.rotary import RotaryEmbedding
from minillm.positions.scaling import SCALINGS, Scaling

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


def rotary_key(model: Transformer, scaling: Scaling, length: int) -> Optional[tuple]:
    """What a window of `length` tokens is rotated with under `scaling` (frequencies and temperature, from the
    scaling's own formula), hashable; None for a model without rotary frequencies. Equal keys, equal
    measurements."""
    position = model.position.rescaled(scaling)
    if not isinstance(position, RotaryEmbedding):
        return None
    inv_freq, attention_factor = position.scaling.frequencies(position.theta, position.rotary_dim, length)
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


@torch.inference_mode()
def tail_loss(model: Transformer, tokens: Tensor, length: int, targets: int, *,
              attention: "str | AttentionMethod" = "full", scaling: Optional[Scaling] = None, logn: bool = False,
              batch_size: int = 4) -> tuple[float, int]:
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
        losses.append(model.token_losses(x, y, attention=method, scaling=scaling, logn=logn)[:, -targets:].float().cpu())
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
