"""RMSNorm with a backward through torch's fused layer-norm kernel (eager) or the formula (compiled)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# ----------------------------------------------------------------------------------------------
# RMSNorm


def _at_least_float32(x: Tensor) -> Tensor:
    """bf16 / fp16 in float32 (no copy for float32, float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _RMSNormFunction(torch.autograd.Function):
    """y = x · r · g with r = (mean(x²) + eps)^−½ per row, saving only x and r.

    Backward, with x̂ = x·r and u = ∂y ⊙ g:  ∂x = r · (u − x̂ · mean(u ⊙ x̂)),  ∂g = Σ_rows ∂y ⊙ x̂.
    That is LayerNorm's backward given mean 0 and r as its rstd, but for one term: LayerNorm's ∂x also
    subtracts r · mean(u), which is added back here. So it runs as torch's fused layer-norm backward (one
    pass) plus a mat-vec and a broadcast add: 2.4x faster (measured by hand, 2048×384 float32) than the
    formula's eight tensor ops, which were themselves twice as fast as autograd's op-by-op backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32, w32 = _at_least_float32(x), _at_least_float32(weight)
        dim = x32.shape[-1]
        rstd = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(dim).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x32, rstd).mul_(w32).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None]:
        x, weight, rstd = ctx.saved_tensors
        x32 = _at_least_float32(x)  # the forward's compute dtype; the fused kernel wants one dtype throughout
        grad32, w32 = grad.to(x32.dtype), weight.to(x32.dtype)
        dim = x32.shape[-1]
        needs_x, needs_weight = ctx.needs_input_grad[:2]
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad32, x32, [dim], torch.zeros_like(rstd), rstd, w32, None, [needs_x, needs_weight, False])
        if needs_x:
            mean_u = torch.mv(grad32.reshape(-1, dim), w32).view_as(rstd)
            grad_x = grad_x.add_(mean_u.mul_(rstd).div_(dim)).to(x.dtype)
        if needs_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dimension, in float32; output dtype = x's."""
    if not torch.compiler.is_compiling():
        return _RMSNormFunction.apply(x, weight, eps)
    # Compiled: Inductor fuses the formula itself into one kernel each way.
    x32 = _at_least_float32(x)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # Gain applied in float32 too, one rounding at the end, whatever the weight's dtype.
    return (normed * _at_least_float32(weight)).to(x.dtype)
