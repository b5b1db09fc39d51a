"""Rotary rotation's fast paths, and the choice among them.

positions/rotary.py's rotate_complex / rotate_interleaved / rotate_half are the reference formulas; each makes four to
six full-size temporaries, and on CPU a temporary above glibc's mmap threshold (32 MiB at most) is a fresh
mapping whose pages fault in on first touch. `rotate` picks one of these, each writing one output buffer:

    rotate_triton      CUDA with Triton installed: either layout in one kernel, whatever the input dtype:
                       one read and one write of x, float32 arithmetic, one rounding to x's dtype.
    compiled           under torch.compile, the real-valued reference formula, which Inductor fuses.
    rotate_pairs       adjacent pairs (complex, interleaved) as one complex multiplication: one pass.
    rotate_half_fused  pairs (i, i + d/2): one full-width multiply, then a fused multiply-add into each
                       half of that buffer. It stays slower than rotate_pairs in eager torch (1.5-3x on
                       CPU): no complex view exists for pairs d/2 apart, and an op on half-width views
                       runs one inner loop per row of d/2 floats, whose overhead exceeds the arithmetic.
                       In a whole training step the gap is a few per cent (benchmarks/train_bench.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch kernels below serve every device
    triton = None

TRITON_AVAILABLE = triton is not None


def _complex_view(x: Tensor) -> Tensor:
    """x (..., d) as (..., d/2) complex numbers without a copy where the strides allow it."""
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.clone(memory_format=torch.contiguous_format)
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


def rotate_pairs(x: Tensor, rotation: Tensor) -> Tensor:
    """Pairs (x[2i], x[2i+1]) times rotation = cos + i·sin (complex64): one elementwise kernel.

    Autograd's own backward is one kernel too: grad times the conjugate rotation.
    """
    return torch.view_as_real(_complex_view(x) * rotation).flatten(-2)


def _rotate_half_into(x: Tensor, cos_full: Tensor, sin: Tensor, sign: float) -> Tensor:
    """sign = 1: (x_low·cos − x_high·sin, x_high·cos + x_low·sin); sign = −1 the inverse (transposed) rotation.

    cos_full = (cos, cos) over the whole width, so the first pass runs over contiguous rows; the two fused
    multiply-adds then work on half-width rows (the slow part, see the module docstring).
    """
    out = x * cos_full
    half = x.shape[-1] // 2
    out[..., :half].addcmul_(x[..., half:], sin, value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin, value=sign)
    return out


class _RotateHalf(torch.autograd.Function):
    """The backward of a rotation by [[c, −s], [s, c]] is its transpose [[c, s], [−s, c]] (magnitudes
    included): the same kernel with sin negated, so the gradient also costs one output buffer."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos_full = torch.cat((cos, cos), dim=-1)  # (seq, d): 1/(batch·heads) of x, built once per call
        ctx.save_for_backward(cos_full, sin)
        return _rotate_half_into(x, cos_full, sin, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos_full, sin = ctx.saved_tensors
        return _rotate_half_into(grad, cos_full, sin, -1.0), None, None


def rotate_half_fused(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Pairs (x[i], x[i + d/2]) rotated into one output buffer; equals rope.rotate_half."""
    return _RotateHalf.apply(x, cos, sin)


# ----------------------------------------------------------------------------------------------
# Triton (CUDA): one program rotates BLOCK_ROWS rows (one row = one (batch, head, position) vector).

if TRITON_AVAILABLE:

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, n_rows, heads, seq, stride_xb, stride_xh, stride_xt,
                       stride_cb, stride_ct, sign, HALF: tl.constexpr, ADJACENT: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # flat (batch, head, position)
        pairs = tl.arange(0, BLOCK_HALF)
        mask = (rows < n_rows)[:, None] & (pairs < HALF)[None, :]
        t = (rows % seq).to(tl.int64)
        h = ((rows // seq) % heads).to(tl.int64)
        b = (rows // (seq * heads)).to(tl.int64)
        if ADJACENT:  # complex / interleaved: (x[2i], x[2i+1])
            first = 2 * pairs
            second = first + 1
        else:  # rotate_half: (x[i], x[i + d/2])
            first = pairs
            second = pairs + HALF
        x_row = (b * stride_xb + h * stride_xh + t * stride_xt)[:, None]
        out_row = (rows.to(tl.int64) * (2 * HALF))[:, None]  # out is contiguous (batch, heads, seq, d)
        table = (b * stride_cb + t * stride_ct)[:, None] + pairs[None, :]
        c = tl.load(cos_ptr + table, mask=mask, other=0.0)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0) * sign
        x0 = tl.load(x_ptr + x_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + x_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_row + first[None, :], (x0 * c - x1 * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + out_row + second[None, :], (x1 * c + x0 * s).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, adjacent: bool, sign: float) -> Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    batch, heads, seq, dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    stride_cb, stride_ct = (0, cos.stride(0)) if cos.dim() == 2 else (cos.stride(0), cos.stride(1))
    block_half = triton.next_power_of_2(dim // 2)
    block_rows = max(1, 4096 // block_half)
    n_rows = batch * heads * seq
    if n_rows == 0:
        return out
    _rotary_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, out, cos, sin, n_rows, heads, seq, x.stride(0), x.stride(1), x.stride(2), stride_cb, stride_ct, sign,
        HALF=dim // 2, ADJACENT=adjacent, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half)
    return out


class _TritonRotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, adjacent: bool) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.adjacent = adjacent
        return _launch(x, cos, sin, adjacent, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, ctx.adjacent, -1.0), None, None, None


def rotate_triton(x: Tensor, cos: Tensor, sin: Tensor, adjacent: bool) -> Tensor:
    """x (batch, heads, seq, d) on CUDA, any float dtype; cos, sin (seq, d/2) or per batch (batch, seq, d/2).

    adjacent: pairs (2i, 2i+1) as complex and interleaved; otherwise (i, i + d/2) as rotate_half.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("rotate_triton: triton is not installed")
    return _TritonRotation.apply(x, cos, sin, adjacent)


def triton_applies(x: Tensor) -> bool:
    """Whether rotate_triton serves x: a 4-d CUDA tensor where Triton is installed."""
    return TRITON_AVAILABLE and x.is_cuda and x.dim() == 4


def rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, adjacent: bool,
           formula: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
    """Rotate the first rotary_dim channels of x (batch, heads, seq, head_dim) by cos, sin (P, 1, seq, r/2),
    P = 1 or batch; the other channels pass through bit-identical. Arithmetic in float32, one rounding to
    x's dtype. adjacent: pairs (2i, 2i+1), else (i, i + d/2); formula: the real-valued reference for that
    pairing (rope.rotate_interleaved or rope.rotate_half), which compiled code runs."""
    r = rotary_dim
    if torch.compiler.is_compiling():
        rotated = formula(x[..., :r].float(), cos, sin).to(x.dtype)  # Inductor fuses it into one kernel
    elif triton_applies(x):
        flat_cos, flat_sin = (cos[0, 0], sin[0, 0]) if cos.shape[0] == 1 else (cos[:, 0], sin[:, 0])
        rotated = rotate_triton(x[..., :r], flat_cos, flat_sin, adjacent)
    else:
        # Rotated in float32, rounded once to x's dtype, and laid out as attention wants its heads: each head's
        # (seq, head_dim) block dense (model.Attention). No copy where x is that already, in float32.
        part = x[..., :r].to(torch.float32, memory_format=torch.contiguous_format)
        rotated = rotate_pairs(part, torch.complex(cos, sin)) if adjacent else rotate_half_fused(part, cos, sin)
        rotated = rotated.to(x.dtype)
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)
