"""Attention patterns at evaluation time: which keys each query may see (bool masks, True = may attend).

Each pattern is one function `(length, window, device) -> mask or None`, registered with `@register_pattern`;
None wherever the pattern is plain causal attention, so SDPA keeps its fused causal kernels.
`window` is the model's training length.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

Pattern = Callable[[int, int, torch.device], Optional[Tensor]]
ATTENTION_PATTERNS: dict[str, Pattern] = {}


def register_pattern(name: str):
    def add(fn: Pattern) -> Pattern:
        ATTENTION_PATTERNS[name] = fn
        return fn

    return add


def _grid(length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Query and key indices as a (length, 1) and a (1, length) tensor."""
    index = torch.arange(length, device=device)
    return index[:, None], index[None, :]


@register_pattern("full")
def full(length: int, window: int, device: torch.device) -> Optional[Tensor]:
    """Plain causal attention over the whole sequence."""
    return None


@register_pattern("blockwise")
def blockwise(length: int, window: int, device: torch.device) -> Optional[Tensor]:
    """Blockwise causal (Sun et al. 2022, arXiv:2212.10554, sec. 3.3): blocks of window/2 tokens attend
    causally to their own block and the one before, so no query sees keys `window` or more positions back."""
    block = max(window // 2, 1)
    if length <= 2 * block:
        return None
    query, key = _grid(length, device)
    return (key <= query) & (query // block - key // block <= 1)


@register_pattern("sliding")
def sliding(length: int, window: int, device: torch.device) -> Optional[Tensor]:
    """Sliding window: each query sees the last `window` keys, itself included."""
    if length <= window:
        return None
    query, key = _grid(length, device)
    return (key <= query) & (query - key < window)


def attention_mask(pattern: str, length: int, window: int, device: torch.device) -> Optional[Tensor]:
    """The (length, length) mask of a registered pattern, or None for plain causal attention."""
    if pattern not in ATTENTION_PATTERNS:
        raise ValueError(f"attention: got {pattern!r}, expected one of {sorted(ATTENTION_PATTERNS)}")
    return ATTENTION_PATTERNS[pattern](length, window, device)
