"""Fused projections (q, k, v; gate, up) whose backward never concatenates its parts' gradients into one buffer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from minillm.kernels.loss import _matmul_dtype

# ----------------------------------------------------------------------------------------------
# A fused projection returned in parts


class _SplitLinear(torch.autograd.Function):
    """y = x Wᵀ + b as one matmul, returned in parts along the features.

    Autograd's backward of linear-then-split first copies the parts' gradients into one (tokens, Σ parts)
    buffer (SplitBackward's cat: 6% of a model=small CPU step) and then multiplies. This one consumes each
    part where it lies: ∂x = Σ_p ∂y_p W_p, accumulated in one buffer, and ∂W_p = ∂y_pᵀ x into W's rows.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        # Under autocast, keep x in the matmul dtype, as F.linear's own autograd would: half the saved bytes.
        x_mm = x.to(_matmul_dtype(x, weight))
        ctx.save_for_backward(x_mm, weight)
        ctx.sizes, ctx.x_dtype = sizes, x.dtype
        ctx.set_materialize_grads(False)  # an unused part's gradient stays None: no matmul on zeros
        return F.linear(x_mm, weight, bias).split(sizes, dim=-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Under autocast the parts' gradients come in the autocast dtype; so does every matmul here.
        dtype = next((g.dtype for g in grads if g is not None), x.dtype)
        flat_x = x.reshape(-1, x.shape[-1]).to(dtype)
        flat_grad_x = None  # Σ_p ∂y_p W_p: the first part's product, then accumulated in place
        grad_weight = torch.empty_like(weight) if need_weight else None
        grad_bias = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device) if need_bias else None
        start = 0
        for grad, size in zip(grads, ctx.sizes):
            rows = slice(start, start + size)
            start += size
            if grad is None:  # a part nobody used: zero gradient for its rows
                if grad_weight is not None:
                    grad_weight[rows] = 0.0
                if grad_bias is not None:
                    grad_bias[rows] = 0.0
                continue
            flat_grad = grad.reshape(-1, size)
            if need_x and flat_grad_x is None:
                flat_grad_x = flat_grad @ weight[rows].to(dtype)
            elif need_x:
                flat_grad_x.addmm_(flat_grad, weight[rows].to(dtype))
            if grad_weight is not None:
                if grad_weight.dtype == dtype:
                    torch.mm(flat_grad.T, flat_x, out=grad_weight[rows])
                else:
                    grad_weight[rows] = flat_grad.T @ flat_x
            if grad_bias is not None:
                grad_bias[rows] = flat_grad.sum(0)
        grad_x = None
        if need_x:
            grad_x = torch.zeros(x.shape, dtype=ctx.x_dtype, device=x.device) if flat_grad_x is None \
                else flat_grad_x.view(x.shape).to(ctx.x_dtype)
        return grad_x, grad_weight, grad_bias, None


def split_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """F.linear(x, weight, bias).split(sizes, dim=-1), with the backward of _SplitLinear. Compiled code
    takes the plain formula: Inductor plans that backward's memory itself."""
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias).split(sizes, dim=-1)
    return _SplitLinear.apply(x, weight, bias, tuple(sizes))
