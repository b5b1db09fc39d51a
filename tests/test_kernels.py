"""The fused kernels equal their reference formulas, forward and backward: the rotations against rope.py on
every input layout, the fused LM head + cross-entropy against F.cross_entropy on full logits, the split
projection against F.linear then split."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import torch.nn.functional as F

from minillm.kernels import (TRITON_AVAILABLE, linear_cross_entropy, rotate_half_fused, rotate_pairs, rotate_triton, split_linear)
from minillm.positions.rotary import rotate_half, rotate_interleaved


def tables(seq: int, half: int, dtype=torch.float32, magnitude: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(seq, half, generator=g, dtype=torch.float64) * 6.3
    scale = torch.rand(seq, half, generator=g, dtype=torch.float64) + 0.5 if magnitude else 1.0  # XPos-like
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def projected(batch: int, seq: int, heads: int, head_dim: int, dtype=torch.float32,
              device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as Attention makes them: strided views into one fused projection, (batch, heads, seq, head_dim)."""
    qkv = torch.randn(batch, seq, 3 * heads * head_dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    qkv = qkv.to(device)
    q, k, _ = qkv.split(heads * head_dim, dim=-1)
    return (t.view(batch, seq, heads, head_dim).transpose(1, 2) for t in (q, k))


@pytest.mark.parametrize("magnitude", [False, True])
def test_fused_kernels_equal_the_reference_formulas_on_strided_views(magnitude):
    q, k = projected(2, 7, 3, 8)
    cos, sin = tables(7, 4, magnitude=magnitude)
    for x in (q, k, q.contiguous(), k[..., 1:5, :]):
        c, s = (cos, sin) if x.shape[-2] == 7 else (cos[1:5], sin[1:5])
        torch.testing.assert_close(rotate_pairs(x, torch.complex(c, s)), rotate_interleaved(x, c, s))
        torch.testing.assert_close(rotate_half_fused(x, c, s), rotate_half(x, c, s))


def test_per_batch_tables_broadcast_over_heads():
    q, _ = projected(2, 5, 3, 8)
    cos, sin = (t.view(2, 5, 4) for t in tables(10, 4))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seq, d/2)
    torch.testing.assert_close(rotate_pairs(q, torch.complex(cos, sin)), rotate_interleaved(q, cos, sin))
    torch.testing.assert_close(rotate_half_fused(q, cos, sin), rotate_half(q, cos, sin))


def test_odd_strides_are_copied_not_misread():
    """A view whose strides cannot be read as complex pairs (odd offset) goes through a copy."""
    base = torch.randn(2, 3, 5, 9)
    x = base[..., 1:]  # storage offset 1: no complex view of it exists
    cos, sin = tables(5, 4)
    torch.testing.assert_close(rotate_pairs(x, torch.complex(cos, sin)), rotate_interleaved(x, cos, sin))


@pytest.mark.parametrize("kernel", ["pairs", "half"])
def test_gradients_pass_gradcheck(kernel):
    """The backward is the transposed rotation (magnitudes included); checked in float64 by finite differences."""
    cos, sin = tables(4, 3, torch.float64, magnitude=True)
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    if kernel == "pairs":
        rotation = torch.complex(cos, sin)
        assert torch.autograd.gradcheck(lambda x: rotate_pairs(x, rotation), (x,))
    else:
        assert torch.autograd.gradcheck(lambda x: rotate_half_fused(x, cos, sin), (x,))


def test_gradients_equal_the_reference_formulas_on_strided_views():
    q, _ = projected(2, 6, 2, 8)
    q.requires_grad_()
    cos, sin = tables(6, 4, magnitude=True)
    grad = torch.randn(2, 2, 6, 8)
    for fused, reference in ((lambda x: rotate_pairs(x, torch.complex(cos, sin)), rotate_interleaved),
                             (lambda x: rotate_half_fused(x, cos, sin), rotate_half)):
        (ours,) = torch.autograd.grad(fused(q), q, grad)
        (theirs,) = torch.autograd.grad(reference(q, cos, sin), q, grad)
        torch.testing.assert_close(ours, theirs)


# ----------------------------------------------------------------------------------------------
# Triton: the kernel agrees with the torch path, and RotaryEmbedding through it with itself through torch.
# On CUDA directly; without a GPU through Triton's interpreter (TRITON_INTERPRET=1, read when the kernel
# is defined, hence a pytest of these tests in a fresh process), so CI checks the kernel that GPUs run.

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (TRITON_AVAILABLE and (torch.cuda.is_available() or INTERPRETED)),
                                  reason="needs triton, and CUDA or TRITON_INTERPRET=1")


@contextlib.contextmanager
def routed_to_triton():
    """The tensors kernels.rotate sends to rotate_triton meanwhile; under the interpreter, CPU tensors too."""
    import minillm.kernels.rotary

    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return rotate_triton(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(minillm.kernels.rotary, "rotate_triton", counted)
        if INTERPRETED:
            patch.setattr(minillm.kernels.rotary, "triton_applies", lambda x: x.dim() == 4)
        yield calls


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adjacent", [True, False])
def test_triton_kernel_agrees_with_the_torch_kernels(adjacent, dtype):
    q, _ = projected(2, 33, 3, 64, dtype, TRITON_DEVICE)  # strided views, a row count that is no multiple of the block
    q.requires_grad_()
    assert not q.is_contiguous()
    cos, sin = (t.to(TRITON_DEVICE) for t in tables(33, 32, magnitude=True))
    grad = torch.randn(q.shape, dtype=dtype).to(TRITON_DEVICE)
    ours = rotate_triton(q, cos, sin, adjacent)
    torch_path = (lambda x: rotate_pairs(x, torch.complex(cos, sin))) if adjacent else (lambda x: rotate_half_fused(x, cos, sin))
    theirs = torch_path(q.float()).to(dtype)
    # bf16: assert_close's default, two bf16 steps (the interpreter truncates to bf16 where GPUs round).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    assert ours.dtype == dtype and ours.is_contiguous()
    torch.testing.assert_close(ours, theirs, **tol)
    (ours_grad,) = torch.autograd.grad(ours, q, grad)
    (theirs_grad,) = torch.autograd.grad(theirs, q, grad)
    torch.testing.assert_close(ours_grad, theirs_grad, **tol)


@needs_triton
@pytest.mark.parametrize("variant", ["complex", "interleaved", "rotate_half"])
def test_rotary_embedding_through_triton_equals_the_torch_path(variant):
    from minillm.positions.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    positions = torch.randint(0, 500, (2, 40), generator=g)
    for kwargs in ({}, {"offset": 7}, {"positions": positions}):
        for xpos, rotary_dim in ((None, None), (64.0, 12)):
            reference = RotaryEmbedding(16, variant, rotary_dim=rotary_dim, xpos_scale_base=xpos)
            theirs = reference(q, k, **kwargs)  # CPU, torch path
            triton_path = RotaryEmbedding(16, variant, rotary_dim=rotary_dim, xpos_scale_base=xpos).to(TRITON_DEVICE)
            device_kwargs = {key: v.to(TRITON_DEVICE) if torch.is_tensor(v) else v for key, v in kwargs.items()}
            with routed_to_triton() as calls:
                ours = triton_path(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), **device_kwargs)
            assert len(calls) == 2  # q and k, each through the kernel
            for ours_part, theirs_part in zip(ours, theirs):
                torch.testing.assert_close(ours_part.cpu(), theirs_part, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not TRITON_AVAILABLE or torch.cuda.is_available() or INTERPRETED,
                    reason="needs triton on a machine without CUDA (with CUDA the tests above run directly)")
def test_triton_kernel_under_the_interpreter():
    """The Triton tests above, in a fresh process with TRITON_INTERPRET=1: every one runs and passes."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-k", "triton and not interpreter", "-p", "no:xdist", "-p", "no:cacheprovider", "-q"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.parametrize("variant", ["complex", "rotate_half"])
@pytest.mark.parametrize("xpos", [None, 32.0])
def test_cached_tables_built_under_inference_mode_never_reach_autograd(variant, xpos):
    """Tables derived under inference_mode (XPos for a new length, the complex form) are rebuilt for training."""
    from minillm.positions.rotary import RotaryEmbedding

    rope = RotaryEmbedding(8, variant, xpos_scale_base=xpos)
    x = torch.randn(1, 2, 20, 8)
    rope(x, x)  # plain tables for 32 positions, built with autograd on
    with torch.inference_mode():
        rope(x[..., :10, :], x[..., :10, :])  # a shorter length: derived tables built in inference mode
    weight = torch.randn(8, 8, requires_grad=True)
    q = x[..., :10, :] @ weight
    q_rot, k_rot = rope(q, q)
    (q_rot * k_rot).sum().backward()
    assert weight.grad is not None and bool(weight.grad.isfinite().all())


# ----------------------------------------------------------------------------------------------
# LM head + cross-entropy


def head_inputs(tokens: int, dim: int, vocab: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, dim, generator=g, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 1000])  # 37 tokens: chunks of 1, a ragged last one, whole
def test_linear_cross_entropy_equals_cross_entropy_on_full_logits(chunk_tokens):
    hidden, weight, targets = head_inputs(37, 16, 50)
    hidden.requires_grad_(), weight.requires_grad_()
    ours = linear_cross_entropy(hidden, weight, targets, chunk_tokens)
    ours_grads = torch.autograd.grad(ours * 3.0, (hidden, weight))  # a downstream factor reaches both gradients
    theirs = F.cross_entropy(hidden @ weight.T, targets)
    theirs_grads = torch.autograd.grad(theirs * 3.0, (hidden, weight))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b)


def test_linear_cross_entropy_passes_gradcheck():
    hidden, weight, targets = head_inputs(9, 4, 7, torch.float64)
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, 4), (hidden, weight))


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37])
def test_linear_cross_entropy_ignores_targets_at_ignore_index_as_cross_entropy_does(chunk_tokens):
    # The answer-only loss of the synthetic tasks: ignored rows leave the mean and both gradients.
    hidden, weight, targets = head_inputs(37, 16, 50)
    targets[::3] = -100
    targets[5:9] = -100
    hidden.requires_grad_(), weight.requires_grad_()
    ours = linear_cross_entropy(hidden, weight, targets, chunk_tokens)
    ours_grads = torch.autograd.grad(ours * 2.0, (hidden, weight))
    theirs = F.cross_entropy(hidden @ weight.T, targets)  # ignore_index=-100 by default
    theirs_grads = torch.autograd.grad(theirs * 2.0, (hidden, weight))
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b)
    assert ours_grads[0][targets == -100].abs().max() == 0  # a prompt token gets no gradient through the head
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_tokens), theirs)
    # Every target ignored: nan, as F.cross_entropy gives, in both paths.
    assert linear_cross_entropy(hidden, weight, torch.full_like(targets, -100), chunk_tokens).isnan()
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, torch.full_like(targets, -100), chunk_tokens).isnan()


def test_linear_cross_entropy_with_ignored_targets_passes_gradcheck():
    hidden, weight, targets = head_inputs(9, 4, 7, torch.float64)
    targets[[0, 4, 5]] = -100
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, 4), (hidden, weight))


def test_linear_cross_entropy_grads_only_what_requires_them_and_nothing_without_autograd():
    hidden, weight, targets = head_inputs(20, 8, 30)
    expected = F.cross_entropy(hidden @ weight.T, targets)
    weight.requires_grad_()
    (grad_weight,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, 6), weight)
    (expected_grad,) = torch.autograd.grad(F.cross_entropy(hidden @ weight.T, targets), weight)
    torch.testing.assert_close(grad_weight, expected_grad)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 6)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected)


def test_linear_cross_entropy_stays_finite_for_huge_logits():
    """The row maximum comes out before exp: logits of 1e4 neither overflow nor lose the loss."""
    hidden, weight, targets = head_inputs(12, 8, 20)
    hidden = (hidden * 1e3).requires_grad_()
    ours = linear_cross_entropy(hidden, weight, targets, 5)
    (grad,) = torch.autograd.grad(ours, hidden)
    theirs = F.cross_entropy(hidden @ weight.T, targets)
    assert torch.isfinite(ours) and bool(grad.isfinite().all())
    torch.testing.assert_close(ours, theirs)


def test_linear_cross_entropy_under_bf16_autocast_matches_the_autocast_reference():
    """Mixed precision as Lightning's bf16-mixed runs it: matmuls in bf16, softmax and loss in float32."""
    hidden, weight, targets = head_inputs(64, 32, 100)
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, targets, 16)
        theirs = F.cross_entropy((hidden @ weight.T).float(), targets)
    ours_grads = torch.autograd.grad(ours, (hidden, weight))
    theirs_grads = torch.autograd.grad(theirs, (hidden, weight))
    assert ours.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in ours_grads)  # each gradient in its parameter's dtype
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_linear_cross_entropy_names_bad_shapes():
    hidden, weight, targets = head_inputs(10, 8, 20)
    with pytest.raises(ValueError, match=r"hidden \(tokens, d\) and targets \(tokens,\).*\(10, 8\) and \(9,\)"):
        linear_cross_entropy(hidden, weight, targets[:9])
    with pytest.raises(ValueError, match="no tokens"):
        linear_cross_entropy(hidden[:0], weight, targets[:0])


# ----------------------------------------------------------------------------------------------
# Split projection


def projection(dtype=torch.float32, bias: bool = True):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 6, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(9, 6, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return x, weight, b


@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_equals_linear_then_split(bias):
    x, weight, b = projection(bias=bias)
    sizes = (4, 2, 3)
    grads = [torch.randn(2, 5, n) for n in sizes]
    inputs = [t for t in (x, weight, b) if t is not None]
    ours = split_linear(x, weight, b, sizes)
    theirs = F.linear(x, weight, b).split(sizes, dim=-1)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c)
    ours_grads = torch.autograd.grad(ours, inputs, grads)
    theirs_grads = torch.autograd.grad(theirs, inputs, grads)
    for a, c in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, c)


def test_split_linear_passes_gradcheck_with_a_part_left_unused():
    x, weight, b = projection(torch.float64)
    # the middle part feeds nothing: its weight rows and bias entries get exactly zero gradient
    assert torch.autograd.gradcheck(lambda x, w, b: [split_linear(x, w, b, (4, 2, 3))[i] for i in (0, 2)], (x, weight, b))
    first, _, last = split_linear(x, weight, b, (4, 2, 3))
    grad_weight, grad_bias = torch.autograd.grad(first.sum() + last.sum(), (weight, b))
    assert torch.equal(grad_weight[4:6], torch.zeros(2, 6, dtype=torch.float64))
    assert torch.equal(grad_bias[4:6], torch.zeros(2, dtype=torch.float64))


def test_split_linear_under_bf16_autocast_matches_the_autocast_reference():
    x, weight, b = projection()
    sizes = (4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = split_linear(x, weight, b, sizes)
        theirs = F.linear(x, weight, b).split(sizes, dim=-1)
    assert all(t.dtype == torch.bfloat16 for t in ours)
    loss_ours = sum((t.float() ** 2).sum() for t in ours)
    loss_theirs = sum((t.float() ** 2).sum() for t in theirs)
    ours_grads = torch.autograd.grad(loss_ours, (x, weight, b))
    theirs_grads = torch.autograd.grad(loss_theirs, (x, weight, b))
    for a, c in zip(ours_grads, theirs_grads):
        assert a.dtype == c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


def test_split_linear_without_autograd_is_the_plain_split():
    x, weight, b = projection()
    with torch.no_grad():
        parts = split_linear(x, weight, b, (4, 5))
    assert all(p.grad_fn is None for p in parts)
    torch.testing.assert_close(torch.cat(parts, dim=-1), F.linear(x, weight, b).detach())


def test_linear_cross_entropy_gradients_stay_accurate_in_bf16_for_confident_tokens():
    """softmax − onehot is small where the model is sure; it must be formed before rounding to bf16,
    or the one-hot would cancel against a rounded e_target and leave only rounding error."""
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(1024, 64, generator=g)
    targets = torch.randint(0, 1024, (512,), generator=g)
    hidden = weight[targets] * 0.5 + torch.randn(512, 64, generator=g) * 0.1  # p(target) near 1
    reference_inputs = (hidden.double().requires_grad_(), weight.double().requires_grad_())
    reference = torch.autograd.grad(F.cross_entropy(reference_inputs[0] @ reference_inputs[1].T, targets),
                                    reference_inputs)
    p_target = (reference_inputs[0] @ reference_inputs[1].T).softmax(-1).gather(1, targets[:, None]).mean()
    assert p_target > 0.99
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, 128), (hidden, weight))
    for grad, expected in zip(ours, reference):
        relative_error = ((grad.double() - expected).norm() / expected.norm()).item()
        assert relative_error < 0.1, relative_error


def test_split_linear_with_a_frozen_weight_grads_the_input_only():
    x, weight, b = projection()
    weight.requires_grad_(False)
    ours = split_linear(x, weight, b, (4, 5))
    (grad_x,) = torch.autograd.grad(ours[0].sum() + 2 * ours[1].sum(), (x,))
    expected = torch.cat((torch.ones(4), 2 * torch.ones(5))) @ weight
    torch.testing.assert_close(grad_x, expected.expand(2, 5, 6))
