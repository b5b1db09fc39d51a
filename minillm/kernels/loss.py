"""The training loss: mean cross-entropy of hidden @ weight.T without ever holding
the (tokens, vocab) logits, their log-softmax or their gradient at full size (see its docstring).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# ----------------------------------------------------------------------------------------------
# LM head + cross-entropy, chunked over tokens, gradients computed in the forward pass.

def _chunk_tokens(vocab: int, device: torch.device) -> int:
    """Tokens per chunk. CPU: enough for 2^20 logits (4 MiB, cache-resident between the matmul that writes
    a chunk and the two that read its gradient) but never under 256 tokens, as thinner matmuls lose more
    than the cache gains (32-token chunks at a 32k vocabulary ran 1.3x slower than F.cross_entropy).
    CUDA: 2^24 logits, at least 1024 tokens, so each matmul fills the device (not measured on a GPU)."""
    if device.type == "cpu":
        return max(256, (1 << 20) // vocab)
    return max(1024, (1 << 24) // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per chunk of tokens: logits = h Wᵀ, loss = logsumexp(logits) − logits[target], and at once the
    gradient of the summed loss, softmax(logits) − onehot(target), which gives ∂h = g W and ∂W += gᵀ h.

    The chunk's logits become its gradient in place, so memory holds one (chunk, vocab) buffer instead of
    logits, log-softmax and their gradients for every token (the approach of Liger-Kernel's fused linear
    cross-entropy, Hsu et al. 2024, arXiv:2410.10989). Backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int) -> Tensor:
        device_type = hidden.device.type
        mm_dtype = _matmul_dtype(hidden, weight)
        acc_dtype = torch.promote_types(mm_dtype, torch.float32)  # float32, or float64 for float64 inputs
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if need_weight else None
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            w = weight.to(mm_dtype)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(mm_dtype)
                scored = targets[start:start + chunk] != ignore_index
                t = targets[start:start + chunk].clamp(min=0)  # an ignored row's index only needs to be valid
                logits = (h @ w.T).to(acc_dtype)
                target_logits = logits.gather(1, t[:, None]).squeeze(1)
                # softmax − onehot = (e − s·onehot) / s, with e = exp(logits − max) kept unnormalised in the
                # logits' buffer: the 1/s goes onto the (chunk, d) sides of the two matmuls instead, one pass
                # fewer over the chunk. The one-hot comes off in acc_dtype, before any rounding to bf16: for a
                # confident token e_target ≈ s, and subtracting after a bf16 matmul would leave its rounding error.
                row_max = logits.amax(dim=-1, keepdim=True)
                e = logits.sub_(row_max).exp_()
                s = e.sum(dim=-1, keepdim=True)
                total += (s.log() + row_max).squeeze(1).sub_(target_logits).mul_(scored).sum()
                e.scatter_add_(1, t[:, None], -s)
                # An ignored row's 1/s is 0: both of its gradients vanish without another pass over e.
                inv_s = s.reciprocal_().mul_(scored[:, None])
                e_mm = e.to(mm_dtype)
                # ∂h = ((e − s·onehot) W) / s;  ∂W += (e − s·onehot)ᵀ (h / s)
                if need_hidden:
                    rows = grad_hidden[start:start + chunk]
                    if rows.dtype == mm_dtype:
                        torch.mm(e_mm, w, out=rows)
                    else:
                        rows.copy_(e_mm @ w)
                    rows.mul_(inv_s)
                if need_weight:
                    scaled = h * inv_s.to(mm_dtype)
                    if mm_dtype == acc_dtype:
                        grad_weight.addmm_(e_mm.T, scaled)
                    else:
                        grad_weight += e_mm.T @ scaled
        count = (targets != ignore_index).sum()  # 0 gives nan, as F.cross_entropy does
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None, None, None]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count  # the mean's 1/N, and whatever multiplies the loss downstream
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: Optional[int] = None,
                         ignore_index: int = -100) -> Tensor:
    """Mean over tokens of cross_entropy(hidden @ weight.T, targets), in float32 (float64 for float64 inputs).

    hidden (tokens, d), weight (vocab, d), targets (tokens,) int64. Targets equal to ignore_index (F.cross_entropy's
    default, -100) count neither in the mean nor in the gradients (answer-only losses). Without autograd
    (evaluation, no_grad) it scores chunk by chunk and computes no gradient.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected hidden (tokens, d) and targets (tokens,), got "
                         f"{tuple(hidden.shape)} and {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy: no tokens to average over")
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0], hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index)
    mm_dtype = _matmul_dtype(hidden, weight)
    acc_dtype = torch.promote_types(mm_dtype, torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(mm_dtype)
        total = sum(F.cross_entropy((h.to(mm_dtype) @ w.T).to(acc_dtype), t, reduction="sum", ignore_index=ignore_index)
                    for h, t in zip(hidden.split(chunk), targets.split(chunk)))
    return total / (targets != ignore_index).sum()


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply in: autocast's where it is on (float64 stays float64, as autocast
    leaves it), else the weight's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return weight.dtype
