"""Fast paths, and the choice among them: rotary rotation, RMSNorm, the LM head with its cross-entropy,
fused projections, Triton. model.py and rope.py call the plain functions here and read like the math.

rope.py's rotate_complex / rotate_interleaved / rotate_half are the reference formulas; each makes four to
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

rms_norm is RMSNorm with a backward through torch's fused layer-norm kernel (eager) or the formula (compiled).

linear_cross_entropy is the training loss: mean cross-entropy of hidden @ weight.T without ever holding
the (tokens, vocab) logits, their log-softmax or their gradient at full size (see its docstring).

split_linear is a fused projection (q, k, v; gate, up) whose backward never concatenates its parts'
gradients into one buffer.

attention_with_lse is SDPA that also returns each query's log-sum-exp of its scores, what merging disjoint
score sets into one softmax needs (evaluation's attention methods): on CPU without autograd SDPA's flash kernel,
which computes it anyway; elsewhere (CUDA, or with autograd) the explicit formula, in float32, whose scores are
as large as the block of queries the caller gives it. A fused CUDA path (the memory-efficient kernel's
log-sum-exp) is not written yet.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
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
    if q.device.type == "cpu" and not torch.is_grad_enabled():
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
