"""Attention patterns: each by hand, causal, within its window, None where plain causal attention suffices."""

from __future__ import annotations

import pytest
import torch

from minillm.attention import ATTENTION_PATTERNS, attention_mask

CPU = torch.device("cpu")


def test_attention_mask_patterns_by_hand():
    allowed = lambda mask, q: [k for k in range(mask.shape[1]) if mask[q, k]]  # noqa: E731
    sliding = attention_mask("sliding", 8, 3, CPU)
    assert allowed(sliding, 0) == [0]
    assert allowed(sliding, 2) == [0, 1, 2]
    assert allowed(sliding, 5) == [3, 4, 5]
    assert allowed(sliding, 7) == [5, 6, 7]
    blockwise = attention_mask("blockwise", 10, 4, CPU)  # blocks of 2: {0,1} {2,3} {4,5} {6,7} {8,9}
    assert allowed(blockwise, 1) == [0, 1]
    assert allowed(blockwise, 2) == [0, 1, 2]
    assert allowed(blockwise, 3) == [0, 1, 2, 3]
    assert allowed(blockwise, 4) == [2, 3, 4]
    assert allowed(blockwise, 7) == [4, 5, 6, 7]
    assert allowed(blockwise, 9) == [6, 7, 8, 9]
    for mask, window in ((sliding, 3), (blockwise, 4)):
        assert mask.dtype == torch.bool
        query, key = torch.meshgrid(torch.arange(mask.shape[0]), torch.arange(mask.shape[1]), indexing="ij")
        assert not mask[key > query].any()  # causal
        assert (query - key)[mask].max() < window  # never further back than the window
        assert mask.diagonal().all()  # every token sees itself


def test_attention_mask_is_none_where_plain_causal_suffices():
    assert attention_mask("full", 64, 8, CPU) is None
    assert attention_mask("sliding", 8, 8, CPU) is None
    assert attention_mask("blockwise", 8, 8, CPU) is None  # two blocks of 4: the second sees the first
    assert attention_mask("sliding", 9, 8, CPU) is not None
    assert attention_mask("blockwise", 9, 8, CPU) is not None
    with pytest.raises(ValueError, match="attention: got 'dilated'"):
        attention_mask("dilated", 8, 4, CPU)


def test_registry_lists_the_patterns_in_report_order():
    assert list(ATTENTION_PATTERNS) == ["full", "blockwise", "sliding"]
