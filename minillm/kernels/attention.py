"""SDPA that also returns each query's log-sum-exp of its scores, what merging disjoint
score sets into one softmax needs (evaluation's attention methods): on CPU without autograd SDPA's flash kernel,
which computes it anyway; elsewhere (CUDA, or with autograd) the explicit formula, in float32, whose scores are
as large as the block of queries the caller gives it. A fused CUDA path (the memory-efficient kernel's
log-sum-exp) is not written yet.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                       causal: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """softmax(q·kᵀ/√d + mask)·v and each query's log-sum-exp of its scores, float32 (batch, heads, q_len).

    q (B, H, q_len, d); k, v (B, H_kv, k_len, d), grouped-query heads repeated here. mask: None (then causal
    when q_len == k_len, else every key; causal=False: every key), bool (True = attend) or additive (−inf =
    not). A query that sees no key gets log-sum-exp −inf (its output is then meaningless: a merge gives it
    weight 0).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    seen = None
    if mask is not None:
        seen = mask.any(-1) if mask.dtype == torch.bool else (mask > float("-inf")).any(-1)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        mask = mask.to(q.dtype)
    causal = mask is None and q.shape[-2] == k.shape[-2] and q.shape[-2] > 1 and causal is not False
    # The fused CPU kernel needs one width for q, k and v; PoPE's q and k are twice as wide as v.
    if q.device.type == "cpu" and not torch.is_grad_enabled() and q.shape[-1] == v.shape[-1]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                        float("-inf"))
        elif mask is not None:
            scores = scores + mask.float()
        lse = scores.logsumexp(-1)
        out = ((scores - lse[..., None]).exp().nan_to_num(0.0) @ v.float()).to(v.dtype)
    lse = lse.float()
    if seen is not None:  # the flash kernel reports 0 for a row it saw nothing of
        lse = lse.masked_fill(~seen, float("-inf"))
    return out, lse
