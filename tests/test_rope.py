"""Position encodings: rotary layouts and their equivalences, the relative-position property, XPos,
frequency scalings against hand-computed values and HF transformers, precision, tables, baselines."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.positions.base import POSITION_ENCODINGS, Positions, position_config
from minillm.positions.contextual import ContextPosition
from minillm.positions.bias import FireBias, KerpleBias, T5Bias, t5_bucket, ALiBi, alibi_slopes
from minillm.positions.rotary import ROTARY_LAYOUTS, MultiAxisRotary, RotaryEmbedding, xpos_max_length
from minillm.positions.absolute import LearnedEmbedding, SinusoidalEmbedding
from minillm.positions.scaling import scaling_config

PROPERTY = settings(max_examples=30, deadline=None)
THETAS = (10.0, 10000.0, 500000.0, 1e6)
XPOS_BASES = (None, 64.0, 512.0)  # None: plain RoPE


# ----------------------------------------------------------------------------------------------
# Helpers


@st.composite
def cases(draw, max_seq: int = 12) -> dict:
    """Shapes, theta and a seed; rotary_dim is even and at most head_dim."""
    head_dim = 2 * draw(st.integers(1, 16))
    return dict(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), seq=draw(st.integers(1, max_seq)),
                head_dim=head_dim, rotary_dim=2 * draw(st.integers(1, head_dim // 2)),
                theta=draw(st.sampled_from(THETAS)), seed=draw(st.integers(0, 2**16)))


def qk(c: dict, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(c["seed"])
    shape = (c["batch"], c["heads"], c["seq"], c["head_dim"])
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def rope_for(c: dict, variant: str, xpos=None, **kwargs) -> RotaryEmbedding:
    return RotaryEmbedding(c["head_dim"], variant, c["theta"], c["rotary_dim"], xpos, **kwargs)


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return q.double() @ k.double().transpose(-1, -2)


def score_bound(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, xpos) -> torch.Tensor:
    """|q_m|·|k_n| times the largest XPos factor of (m, n): a scale for float error in each score."""
    bound = q.double().norm(dim=-1)[..., :, None] * k.double().norm(dim=-1)[..., None, :]
    if xpos is not None:  # ζ ≤ 1, so past keys shrink; future keys grow at most by (7/2)^((n−m)/γ)
        ahead = (k_pos[..., None, :] - q_pos[..., :, None]).clamp(min=0).double()
        bound = bound * 3.5 ** (ahead / xpos)
    return bound


def assert_scores_equal(a: torch.Tensor, b: torch.Tensor, bound: torch.Tensor, rtol: float = 2e-5) -> None:
    error = (a - b).abs()
    worst = (error / bound).max().item()
    assert bool((error <= rtol * bound).all()), f"scores differ by up to {worst:.2e} of their scale"


def half_permutation(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Channels [0, 2, 4, ..., 1, 3, 5, ...] of the rotary part: adjacent pairs -> (i, i + r/2) pairs."""
    return torch.tensor(list(range(0, rotary_dim, 2)) + list(range(1, rotary_dim, 2))
                        + list(range(rotary_dim, head_dim)))


def unit_pairs(length: int, dim: int) -> torch.Tensor:
    """(1, 1, length, dim): every adjacent pair (1, 0), so the complex layout returns (cos, sin) of each angle."""
    x = torch.zeros(1, 1, length, dim)
    x[..., 0::2] = 1.0
    return x


def rotation_of(rope: RotaryEmbedding, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos and sin (attention factor included) that a complex-layout rope applies at 0 .. length-1."""
    assert rope.variant == "complex"
    out = rope(unit_pairs(length, rope.head_dim), unit_pairs(length, rope.head_dim))[0][0, 0].double()
    return out[:, 0::2], out[:, 1::2]


def expected_rotation(inv_freq: list[float], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(length, dtype=torch.float64)[:, None] * torch.tensor(inv_freq, dtype=torch.float64)
    return angles.cos(), angles.sin()


# ----------------------------------------------------------------------------------------------
# Properties of the rotation (hypothesis)


@PROPERTY
@given(c=cases(), base=st.integers(0, 100), shift=st.integers(1, 400), xpos=st.sampled_from(XPOS_BASES))
def test_scores_depend_only_on_relative_position(c, base, shift, xpos):
    q, k = qk(c)
    positions = base + torch.arange(c["seq"])
    bound = score_bound(q, k, positions, positions, xpos)
    for variant in ROTARY_LAYOUTS:
        rope = rope_for(c, variant, xpos)
        reference = scores(*rope(q, k, positions=positions))
        assert_scores_equal(scores(*rope(q, k, positions=positions + shift)), reference, bound)
        assert_scores_equal(scores(*rope(q, k, offset=base + shift)), reference, bound)
        if shift > 2:  # and the scores do depend on the relative position: keys one step later change them
            if c["seq"] > 1 or xpos is not None:
                moved = scores(*rope(q, k, positions=positions, key_positions=positions + 1))
                assert not torch.allclose(moved, reference, rtol=1e-3, atol=1e-3)


@PROPERTY
@given(c=cases(), data=st.data())
def test_rotation_preserves_norms(c, data):
    positions = torch.tensor(data.draw(st.lists(st.integers(0, 5000), min_size=c["seq"], max_size=c["seq"])))
    q, k = qk(c)
    for variant in ROTARY_LAYOUTS:
        q_rot, k_rot = rope_for(c, variant)(q, k, positions=positions)
        torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-6)


@PROPERTY
@given(c=cases(), offset=st.integers(0, 300), xpos=st.sampled_from(XPOS_BASES))
def test_layouts_are_the_same_rotation(c, offset, xpos):
    """complex == interleaved; rotate_half equals them on channels permuted to (i, i + r/2) pairs."""
    q, k = qk(c)
    complex_q, complex_k = rope_for(c, "complex", xpos)(q, k, offset=offset)
    inter_q, inter_k = rope_for(c, "interleaved", xpos)(q, k, offset=offset)
    torch.testing.assert_close(inter_q, complex_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inter_k, complex_k, rtol=1e-5, atol=1e-5)
    perm = half_permutation(c["head_dim"], c["rotary_dim"])
    half_q, half_k = rope_for(c, "rotate_half", xpos)(q[..., perm], k[..., perm], offset=offset)
    torch.testing.assert_close(half_q, complex_q[..., perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half_k, complex_k[..., perm], rtol=1e-5, atol=1e-5)


@PROPERTY
@given(c=cases(), offset=st.integers(0, 300), xpos=st.sampled_from(XPOS_BASES))
def test_partial_rotary_leaves_other_channels_bit_identical(c, offset, xpos):
    q, k = qk(c)
    r = c["rotary_dim"]
    for variant in ROTARY_LAYOUTS:
        q_rot, k_rot = rope_for(c, variant, xpos)(q, k, offset=offset)
        assert torch.equal(q_rot[..., r:], q[..., r:]) and torch.equal(k_rot[..., r:], k[..., r:])
        if offset > 0 and c["theta"] < 1e5:  # the rotary part did move (first pair turns by `offset` radians)
            assert not torch.allclose(q_rot[..., :r], q[..., :r])


@PROPERTY
@given(c=cases())
def test_position_zero_is_the_identity(c):
    q, k = qk(c)
    zeros = torch.zeros(c["seq"], dtype=torch.long)
    for variant in ROTARY_LAYOUTS:
        q_rot, k_rot = rope_for(c, variant)(q, k, positions=zeros)
        assert torch.equal(q_rot, q) and torch.equal(k_rot, k)


@PROPERTY
@given(c=cases(), xpos=st.sampled_from(XPOS_BASES), data=st.data())
def test_per_batch_positions_match_row_by_row(c, xpos, data):
    c = dict(c, batch=data.draw(st.integers(2, 3)))
    rows = [data.draw(st.lists(st.integers(0, 300), min_size=c["seq"], max_size=c["seq"])) for _ in range(c["batch"])]
    positions = torch.tensor(rows)
    q, k = qk(c)
    for variant in ROTARY_LAYOUTS:
        rope = rope_for(c, variant, xpos)
        q_all, k_all = rope(q, k, positions=positions)
        for b in range(c["batch"]):
            q_row, k_row = rope(q[b:b + 1], k[b:b + 1], positions=positions[b])
            if xpos is None:
                torch.testing.assert_close(q_all[b:b + 1], q_row, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(k_all[b:b + 1], k_row, rtol=1e-6, atol=1e-6)
            else:  # XPos centres its scales on the batch's length: vectors differ, scores do not
                bound = score_bound(q[b:b + 1], k[b:b + 1], positions[b], positions[b], xpos)
                assert_scores_equal(scores(q_all[b:b + 1], k_all[b:b + 1]), scores(q_row, k_row), bound)


def test_xpos_multiplies_scores_by_zeta_to_the_distance():
    """One pair (head_dim 2): ζ = 0.4/1.4 = 2/7, so score_xpos(m, n) = score_rope(m, n) · (2/7)^((m−n)/γ)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 40, 2, generator=g), torch.randn(1, 1, 40, 2, generator=g)
    gamma = 16.0
    plain = scores(*RotaryEmbedding(2, "complex")(q, k))
    xpos = scores(*RotaryEmbedding(2, "complex", xpos_scale_base=gamma)(q, k))
    m = torch.arange(40, dtype=torch.float64)
    decay = (2 / 7) ** ((m[:, None] - m[None, :]) / gamma)  # < 1 for past keys, > 1 for future ones
    bound = q.double().norm(dim=-1)[..., :, None] * k.double().norm(dim=-1)[..., None, :] * decay
    assert_scores_equal(xpos, plain * decay, bound)


# ----------------------------------------------------------------------------------------------
# Frequency scalings, by hand (dim 8, theta 10000: θ = [1, 0.1, 0.01, 0.001])


def test_unscaled_frequencies():
    rope = RotaryEmbedding(8)
    assert rope.inv_freq.dtype == torch.float32 and rope.inv_freq.shape == (4,)
    torch.testing.assert_close(rope.inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert rope.attention_factor == 1.0
    # partial rotary: the frequencies of a rotary_dim-wide rope; theta 500000, d = 4: [1, 500000^(-1/2)]
    torch.testing.assert_close(RotaryEmbedding(16, theta=500000.0, rotary_dim=4).inv_freq,
                               torch.tensor([1.0, 1 / math.sqrt(500000.0)]))
    cos, sin = rotation_of(RotaryEmbedding(8), 50)
    expected_cos, expected_sin = expected_rotation([1.0, 0.1, 0.01, 0.001], 50)
    torch.testing.assert_close(cos, expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, expected_sin, atol=1e-6, rtol=0)


def test_linear_scaling_divides_frequencies():
    rope = RotaryEmbedding(8, scaling={"type": "linear", "factor": 4.0})
    torch.testing.assert_close(rope.inv_freq, torch.tensor([0.25, 0.025, 0.0025, 0.00025]))
    assert rope.attention_factor == 1.0


def test_ntk_scaling_raises_the_base():
    rope = RotaryEmbedding(8, scaling={"type": "ntk", "factor": 4.0})
    base = 10000.0 * 4.0 ** (8 / 6)  # base · factor^(d/(d−2))
    torch.testing.assert_close(rope.inv_freq, torch.tensor([base ** (-i / 4) for i in range(4)], dtype=torch.float32))
    assert math.isclose(rope.inv_freq[-1].item(), 0.001 / 4, rel_tol=1e-6)  # lowest frequency: exactly / factor
    assert rope.inv_freq[0].item() == 1.0


def test_dynamic_ntk_scales_only_beyond_the_original_length():
    params = {"type": "dynamic_ntk", "factor": 2.0, "original_max_position": 16}
    rope = RotaryEmbedding(8, scaling=params)
    unscaled = [1.0, 0.1, 0.01, 0.001]
    torch.testing.assert_close(rope.inv_freq, torch.tensor(unscaled))  # the static frequencies: unscaled
    for length in (5, 16):  # up to the original length: plain RoPE
        torch.testing.assert_close(scaling_config(params).frequencies(10000.0, 8, length)[0],
                                   torch.tensor(unscaled, dtype=torch.float64))
        cos, sin = rotation_of(rope, length)
        torch.testing.assert_close((cos, sin), expected_rotation(unscaled, length), atol=1e-6, rtol=0)
    base = 10000.0 * (2 * 2 - 1) ** (8 / 6)  # L = 2·L0, factor 2: base · (factor·L/L0 − (factor − 1))^(d/(d−2))
    scaled = [base ** (-i / 4) for i in range(4)]
    torch.testing.assert_close(scaling_config(params).frequencies(10000.0, 8, 32)[0],
                               torch.tensor(scaled, dtype=torch.float64))
    torch.testing.assert_close(rotation_of(rope, 32), expected_rotation(scaled, 32), atol=1e-6, rtol=0)


def test_yarn_ramps_between_hand_computed_correction_dims():
    """With d = 8, θ = 10^4 the correction dim d·ln(L0/(2π·r))/(2 ln θ) is log10(L0/(2π·r))."""
    low = math.floor(math.log10(2048 / (2 * math.pi * 32)))  # beta_fast = 32 -> 1.008 -> 1
    high = math.ceil(math.log10(2048 / (2 * math.pi * 1)))  # beta_slow = 1 -> 2.51 -> 3
    assert (low, high) == (1, 3)
    ramp = [0.0, 0.0, 0.5, 1.0]  # (i − low)/(high − low), clamped: 0 keeps θ_i, 1 divides it by the factor
    theta = [1.0, 0.1, 0.01, 0.001]
    expected = [t * (1 - r) + t / 4 * r for t, r in zip(theta, ramp)]  # [1, 0.1, 0.00625, 0.00025]
    assert math.isclose(expected[2], 0.00625) and math.isclose(expected[3], 0.00025)
    params = {"type": "yarn", "factor": 4.0, "original_max_position": 2048, "beta_fast": 32.0, "beta_slow": 1.0}
    rope = RotaryEmbedding(8, scaling=params)
    torch.testing.assert_close(rope.inv_freq, torch.tensor(expected))
    assert math.isclose(rope.attention_factor, 0.1 * math.log(4) + 1)  # ≈ 1.1386
    # the temperature is folded into the rotation: every pair comes out scaled by it
    cos, sin = rotation_of(rope, 20)
    torch.testing.assert_close(cos.hypot(sin), torch.full_like(cos, 0.1 * math.log(4) + 1), rtol=1e-6, atol=0)

    overridden = RotaryEmbedding(8, scaling=dict(params, attention_factor=1.5))
    assert overridden.attention_factor == 1.5
    torch.testing.assert_close(overridden.inv_freq, torch.tensor(expected))
    assert RotaryEmbedding(8, scaling=dict(params, factor=1.0)).attention_factor == 1.0  # no extension: no temperature


def test_llama3_keeps_short_wavelengths_and_divides_long_ones():
    """L0 = 1024, low/high_freq_factor 1/4: wavelengths 2π·[1, 10, 100, 1000] against thresholds 256 and 1024."""
    rope = RotaryEmbedding(8, scaling={"type": "llama3", "factor": 8.0, "original_max_position": 1024,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    wavelengths = [2 * math.pi, 20 * math.pi, 200 * math.pi, 2000 * math.pi]
    assert wavelengths[1] < 1024 / 4 < wavelengths[2] < 1024 / 1 < wavelengths[3]
    smooth = (1024 / wavelengths[2] - 1.0) / (4.0 - 1.0)  # ≈ 0.21
    expected = [1.0, 0.1, (1 - smooth) * 0.01 / 8 + smooth * 0.01, 0.001 / 8]
    torch.testing.assert_close(rope.inv_freq, torch.tensor(expected))
    assert rope.attention_factor == 1.0


# ----------------------------------------------------------------------------------------------
# Frequency scalings against HF transformers


def hf_config(head_dim: int, theta: float, rope_type: str, max_positions: int, **params):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=max_positions,
                                    rope_parameters={"rope_type": rope_type, "rope_theta": theta, **params})


HF_CASES = {  # id: (head_dim, rotary_dim, theta, our scaling, HF rope_type, HF max_position_embeddings, HF params)
    "default": (64, 64, 500000.0, None, "default", 64, {}),
    "linear_partial": (16, 8, 10000.0, {"type": "linear", "factor": 4.0}, "linear", 64,
                       {"factor": 4.0, "partial_rotary_factor": 0.5}),
    "yarn": (64, 64, 1e6, {"type": "yarn", "factor": 4.0, "original_max_position": 2048}, "yarn", 8192,
             {"factor": 4.0, "original_max_position_embeddings": 2048}),
    "yarn_partial_override": (32, 16, 10000.0, {"type": "yarn", "factor": 8.0, "original_max_position": 256,
                                                 "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3},
                              "yarn", 2048, {"factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 16.0,
                                             "beta_slow": 2.0, "attention_factor": 1.3, "partial_rotary_factor": 0.5}),
    "llama3": (128, 128, 500000.0, {"type": "llama3", "factor": 8.0, "original_max_position": 8192,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}, "llama3", 131072,
               {"factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0}),
    "dynamic": (16, 16, 10000.0, {"type": "dynamic_ntk", "factor": 2.0, "original_max_position": 64}, "dynamic", 64,
                {"factor": 2.0}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_frequencies_match_hf(case):
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, rotary_dim, theta, scaling, rope_type, max_positions, params = HF_CASES[case]
    config = hf_config(head_dim, theta, rope_type, max_positions, **params)
    ours = RotaryEmbedding(head_dim, "rotate_half", theta, rotary_dim, scaling=scaling)
    if rope_type == "default":
        hf_inv_freq, hf_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    elif rope_type == "dynamic":  # beyond the original length, where dynamic NTK differs from plain RoPE
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=200)
        ours_inv_freq = scaling_config(scaling).frequencies(theta, rotary_dim, 200)[0]
        torch.testing.assert_close(ours_inv_freq.float(), hf_inv_freq, rtol=1e-5, atol=0)
        assert not torch.allclose(ours_inv_freq.float(), ours.inv_freq)
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")  # at the original length
    else:
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    assert ours.inv_freq.shape == (rotary_dim // 2,)
    torch.testing.assert_close(ours.inv_freq, hf_inv_freq.float(), rtol=1e-5, atol=0)
    assert math.isclose(ours.attention_factor, hf_factor, rel_tol=1e-9)


@pytest.mark.parametrize("case", ["default", "yarn", "llama3", "dynamic"])
def test_rotation_matches_hf_llama(case):
    """rotate_half with per-batch positions against HF's LlamaRotaryEmbedding + apply_rotary_pos_emb."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, _, theta, scaling, rope_type, max_positions, params = HF_CASES[case]
    config = hf_config(head_dim, theta, rope_type, max_positions, **params)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 12, head_dim, generator=g), torch.randn(2, 4, 12, head_dim, generator=g)
    positions = torch.stack((torch.arange(12), 150 + torch.arange(12)))  # 162 > the dynamic case's 64
    cos, sin = LlamaRotaryEmbedding(config)(q, positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_q, ours_k = RotaryEmbedding(head_dim, "rotate_half", theta, scaling=scaling)(q, k, positions=positions)
    torch.testing.assert_close(ours_q, hf_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_k, hf_k, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Precision: angles from integer positions in float64, whatever the activation dtype


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("variant", ROTARY_LAYOUTS)
def test_low_precision_activations_keep_positions_apart(dtype, tolerance, variant):
    """bf16 cannot represent 2049..2053 (spacing 16 at 2048); the rotations must still all differ."""
    head_dim, theta = 64, 500000.0
    positions = torch.arange(2048, 2054)
    x = torch.zeros(1, 1, 6, head_dim, dtype=dtype)
    if variant == "rotate_half":
        x[..., : head_dim // 2] = 1.0  # pairs (i, i + d/2) = (1, 0)
    else:
        x[..., 0::2] = 1.0  # pairs (2i, 2i+1) = (1, 0)
    out = RotaryEmbedding(head_dim, variant, theta)(x, x, positions=positions)[0][0, 0]
    assert out.dtype == dtype
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.equal(out[a], out[b]), f"positions {2048 + a} and {2048 + b} rotate alike"
    out = out.double()
    real, imag = (out[:, : head_dim // 2], out[:, head_dim // 2:]) if variant == "rotate_half" else \
        (out[:, 0::2], out[:, 1::2])
    truth = positions[:, None].double() * theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    error = torch.remainder(torch.atan2(imag, real) - truth + math.pi, 2 * math.pi) - math.pi
    assert error.abs().max().item() < tolerance


# ----------------------------------------------------------------------------------------------
# XPos range


def test_xpos_max_length_documented_figures():
    assert xpos_max_length(512, torch.float16) == 2267
    assert xpos_max_length(512, torch.bfloat16) == 33993
    assert xpos_max_length(512, torch.float32) == 33995
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # the limit is tight: one more overflows the budget
        length = xpos_max_length(64, dtype)
        budget = math.log(torch.finfo(dtype).max / 2.0**8)
        assert (length - 1) / 64 * math.log(3.5) <= budget < length / 64 * math.log(3.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_xpos_finite_up_to_its_max_length_and_refuses_beyond(dtype):
    gamma, head_dim = 64.0, 8
    length = xpos_max_length(gamma, dtype)  # 284 for fp16, 4250 for bf16
    rope = RotaryEmbedding(head_dim, "complex", xpos_scale_base=gamma)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(1, 1, length, head_dim, generator=g) * 2 - 1 for _ in range(3))
    q_rot, k_rot = rope(q.to(dtype), k.to(dtype))
    assert q_rot.dtype == dtype and bool(q_rot.isfinite().all()) and bool(k_rot.isfinite().all())
    # every score, the future keys' included (computed before the causal mask drops them), fits the dtype
    raw = q_rot.float() @ k_rot.float().transpose(-1, -2)
    assert raw.abs().max().item() < torch.finfo(dtype).max
    out = torch.nn.functional.scaled_dot_product_attention(q_rot.float(), k_rot.float(), v, is_causal=True)
    assert bool(out.isfinite().all())
    q1, k1 = (torch.zeros(1, 1, length + 1, head_dim, dtype=dtype) for _ in range(2))
    with pytest.raises(ValueError, match="xpos_scale_base"):
        rope(q1, k1)
    with pytest.raises(ValueError, match="xpos_scale_base"):  # the same through explicit positions
        rope(q1[..., :1, :], k1[..., :1, :], positions=torch.tensor([length]))


# ----------------------------------------------------------------------------------------------
# Tables: device and dtype, KV-cache offsets, dynamic lengths, built once per forward


@pytest.mark.parametrize("xpos", XPOS_BASES)
def test_module_to_dtype_and_device(xpos):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    reference = RotaryEmbedding(16, "complex", xpos_scale_base=xpos)(q, k)
    rope = RotaryEmbedding(16, "complex", xpos_scale_base=xpos)
    rope(q, k)
    assert rope.to(torch.float64) is rope  # nn.Module.to must keep working (it goes through Module._apply)
    q64, k64 = rope(q.double(), k.double())
    assert q64.dtype == torch.float64
    torch.testing.assert_close(q64, reference[0].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k64, reference[1].double(), rtol=1e-6, atol=1e-6)
    # a module cast to bf16 (as with bf16-true training) still rotates exactly as before
    rope.to(torch.bfloat16)
    for ours, theirs in zip(rope(q, k), reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # the tables follow the inputs' device (meta here, for want of a GPU) and come back, never left stale
    q_meta, _ = rope(q.to("meta"), k.to("meta"))
    assert q_meta.device.type == "meta"
    for ours, theirs in zip(rope.to("cpu")(q, k), reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_tables_built_under_inference_mode_serve_training():
    rope = RotaryEmbedding(8)
    with torch.inference_mode():
        rope(torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8))
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(1, 1, 6, 8) @ weight
    q, k = rope(x, x)
    (q * k).sum().backward()
    assert weight.grad is not None and bool(weight.grad.isfinite().all())


SCALED = {"none": None, "yarn": {"type": "yarn", "factor": 4.0, "original_max_position": 8},
          "dynamic_ntk": {"type": "dynamic_ntk", "factor": 2.0, "original_max_position": 8}}


@pytest.mark.parametrize("xpos", [None, 16.0])
@pytest.mark.parametrize("scaling", list(SCALED))
@pytest.mark.parametrize("variant", ROTARY_LAYOUTS)
def test_offset_decoding_matches_the_full_sequence(variant, scaling, xpos):
    g = torch.Generator().manual_seed(0)
    length = 20
    q, k = torch.randn(2, 2, length, 8, generator=g), torch.randn(2, 2, length, 8, generator=g)
    rope = RotaryEmbedding(8, variant, rotary_dim=6, xpos_scale_base=xpos, scaling=SCALED[scaling])
    full_q, full_k = rope(q, k)
    # the last 3 queries against the whole (unrotated) cache: the KV-cache layout
    last_q, cache_k = rope(q[..., -3:, :], k, offset=length - 3)
    torch.testing.assert_close(last_q, full_q[..., -3:, :], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache_k, full_k, rtol=1e-6, atol=1e-6)
    if scaling == "dynamic_ntk":
        return  # dynamic NTK picks its frequencies from the current length: step-by-step scores differ by design
    full_scores = scores(full_q, full_k)
    positions = torch.arange(length)
    for t in range(length - 4, length):  # one token at a time, the cache growing
        step_q, step_k = rope(q[..., t:t + 1, :], k[..., :t + 1, :], offset=t)
        bound = score_bound(q[..., t:t + 1, :], k[..., :t + 1, :], positions[t:t + 1], positions[:t + 1], xpos)
        assert_scores_equal(scores(step_q, step_k), full_scores[..., t:t + 1, :t + 1], bound)


def test_dynamic_ntk_tables_switch_with_the_length():
    """Tables follow the requested length both ways: no stale scaled table at short lengths, nor the reverse."""
    params = {"type": "dynamic_ntk", "factor": 2.0, "original_max_position": 16}
    dynamic, plain = RotaryEmbedding(8, scaling=params), RotaryEmbedding(8)
    unscaled = [1.0, 0.1, 0.01, 0.001]

    def scaled(length):
        base = 10000.0 * (2 * length / 16 - 1) ** (8 / 6)
        return [base ** (-i / 4) for i in range(4)]

    for length, inv_freq in [(10, unscaled), (32, scaled(32)), (10, unscaled), (40, scaled(40)), (32, scaled(32)),
                             (16, unscaled), (17, scaled(17))]:
        torch.testing.assert_close(rotation_of(dynamic, length), expected_rotation(inv_freq, length), atol=1e-6, rtol=0)
        same_as_plain = torch.allclose(rotation_of(dynamic, length)[1], rotation_of(plain, length)[1], atol=1e-6)
        assert same_as_plain == (length <= 16)


# ----------------------------------------------------------------------------------------------
# Multi-axis rotary


@PROPERTY
@given(c=cases())
def test_multi_axis_with_one_axis_is_interleaved_rope(c):
    q, k = qk(c)
    g = torch.Generator().manual_seed(c["seed"])
    positions = torch.randint(0, 1000, (c["batch"], c["seq"]), generator=g)
    multi = MultiAxisRotary([c["rotary_dim"]], c["theta"])(q, k, positions[..., None])
    single = rope_for(c, "interleaved")(q, k, positions=positions)
    for ours, theirs in zip(multi, single):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_multi_axis_axes_rotate_their_own_channels():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 14, generator=g), torch.randn(2, 3, 7, 14, generator=g)
    rope = MultiAxisRotary([4, 8])  # channels 0..3: axis 0; 4..11: axis 1; 12, 13 untouched
    positions = torch.randint(0, 50, (2, 7, 2), generator=g)
    moved = positions.clone()
    moved[..., 1] += torch.randint(1, 50, (2, 7), generator=g)
    q_a, k_a = rope(q, k, positions)
    q_b, k_b = rope(q, k, moved)
    assert torch.equal(q_a[..., :4], q_b[..., :4]) and torch.equal(k_a[..., :4], k_b[..., :4])
    assert not torch.allclose(q_a[..., 4:12], q_b[..., 4:12])
    assert torch.equal(q_a[..., 12:], q[..., 12:])
    # axis 1's block is interleaved rope of its own width at its own coordinates
    block = RotaryEmbedding(8, "interleaved")(q[..., 4:12], k[..., 4:12], positions=moved[..., 1])
    torch.testing.assert_close(q_b[..., 4:12], block[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 7), (2, 7, 3), (7, 2)])
def test_multi_axis_rejects_bad_positions(shape):
    q = torch.randn(2, 1, 7, 12)
    with pytest.raises(ValueError, match="positions"):
        MultiAxisRotary([4, 8])(q, q, torch.zeros(shape, dtype=torch.long))


def test_multi_axis_rejects_odd_axes():
    with pytest.raises(ValueError, match="axes_dims"):
        MultiAxisRotary([4, 3])


# ----------------------------------------------------------------------------------------------
# Non-rotary baselines


def test_alibi_slopes_follow_the_reference_algorithm():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the closest power of two (4: 2^-2, 2^-4, 2^-6, 2^-8), then every other of slopes(8): 2^-1, 2^-3
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert alibi_slopes(16)[:2] == pytest.approx([2 ** -0.5, 2 ** -1.0])


def test_alibi_bias_is_linear_in_the_distance_between_positions():
    alibi = ALiBi(8)
    positions = torch.arange(5)[None]
    bias = alibi.attention_bias(positions, positions)
    assert bias.shape == (1, 8, 5, 5) and bias.dtype == torch.float32
    slopes = torch.tensor(alibi_slopes(8))
    for m in range(5):
        for n in range(5):  # future keys too: causal masking is the attention's, by token index
            torch.testing.assert_close(bias[0, :, m, n], -slopes * (m - n))
    # relative: shifted positions give the same bias; per-batch positions give one bias per row
    torch.testing.assert_close(alibi.attention_bias(positions + 1000, positions + 1000), bias)
    grouped = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 2, 3, 4]])
    per_row = alibi.attention_bias(grouped, grouped)
    assert per_row.shape == (2, 8, 5, 5)
    torch.testing.assert_close(per_row[1:], bias)
    torch.testing.assert_close(per_row[0, :, 4, 0], -slopes * 2)


def test_alibi_mask_is_causal_by_token_index_with_the_cache_layout():
    """The model's mask: ALiBi's bias where a key is visible, −inf on later tokens; a chunk after a cache
    is the last rows of the whole mask."""
    from minillm.model.config import ModelConfig
    from minillm.model.masks import mask_rows

    model_cfg = ModelConfig(d_model=32, n_heads=8, rope=position_config("alibi"))
    alibi = model_cfg.rope.build(model_cfg.shape, model_cfg.rope_scaling)
    whole = mask_rows(alibi, Positions.contiguous(0, 5, torch.device("cpu")), range(5), 5, torch.float32, None)
    assert whole.shape == (1, 8, 5, 5)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert bool((whole[0][:, future] == float("-inf")).all()) and bool(whole[0][:, ~future].isfinite().all())
    chunk = mask_rows(alibi, Positions.contiguous(3, 2, torch.device("cpu")), range(2), 5, torch.float32, None)
    torch.testing.assert_close(chunk, whole[:, :, 3:])
    half = mask_rows(alibi, Positions.contiguous(3, 2, torch.device("cpu")), range(2), 5, torch.bfloat16, None)
    assert half.dtype == torch.bfloat16


def test_sinusoidal_embedding_at_an_offset_is_rows_of_the_full_one():
    sinusoidal = SinusoidalEmbedding(12)
    x = torch.zeros(2, 30, 12)
    full = sinusoidal.embed(x, Positions.contiguous(0, 30, x.device))
    torch.testing.assert_close(sinusoidal.embed(x[:, :7], Positions.contiguous(20, 7, x.device)), full[:, 20:27])
    m, omega = 3, 10000.0 ** (-1 / 6)  # row 3, channel pair i = 1 of 6: [cos(m·ω_i) ..., sin(m·ω_i) ...]
    torch.testing.assert_close(full[0, m, [1, 7]], torch.tensor([math.cos(m * omega), math.sin(m * omega)]))
    odd = SinusoidalEmbedding(5).embed(torch.zeros(1, 4, 5), Positions.contiguous(0, 4, x.device))
    assert odd[..., -1].abs().max() == 0  # odd width: zero channel


def test_sinusoidal_table_from_a_config_starts_at_the_token_embeddings_scale():
    from minillm.model.config import ModelConfig

    cfg = ModelConfig(d_model=128, context_length=64, rope=position_config({"variant": "sinusoidal"}), init_std=0.02)
    positions = Positions.contiguous(0, 4096, torch.device("cpu"))
    table = cfg.rope.build(cfg.shape, cfg.rope_scaling).embed(torch.zeros(1, 4096, 128), positions)[0]
    rms = table.pow(2).mean(0).sqrt()  # per channel, over positions
    torch.testing.assert_close(rms.mean(), torch.tensor(0.02), atol=1e-3, rtol=0)
    torch.testing.assert_close(table / 0.02 / math.sqrt(2), SinusoidalEmbedding(128).embed(torch.zeros(1, 4096, 128),
                                                                                           positions)[0])


def test_learned_embedding_refuses_positions_past_its_table():
    learned = LearnedEmbedding(8, 4)
    assert learned.max_length == 8  # the limit the evaluation reads
    cpu = torch.device("cpu")
    torch.testing.assert_close(learned.embed(torch.zeros(1, 3, 4), Positions.contiguous(5, 3, cpu))[0],
                               learned.table.weight[5:8])
    with pytest.raises(ValueError, match=r"0\.\.7"):
        learned.embed(torch.zeros(1, 4, 4), Positions.contiguous(5, 4, cpu))


def test_unknown_encoding_lists_valid_variants():
    with pytest.raises(ValueError, match="rope.variant") as error:
        position_config({"variant": "bogus"})
    assert str(error.value) == f"rope.variant: got 'bogus', expected one of {sorted(POSITION_ENCODINGS)}"
    assert {*ROTARY_LAYOUTS, "alibi", "sinusoidal", "learned", "none"} <= set(POSITION_ENCODINGS)


# ----------------------------------------------------------------------------------------------
# Constructor checks


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=7), "head_dim"),
    (dict(head_dim=8, rotary_dim=5), "rotary_dim"),
    (dict(head_dim=8, rotary_dim=10), "rotary_dim"),
    (dict(head_dim=8, rotary_dim=0), "rotary_dim"),
    (dict(head_dim=8, variant="rotate_quarter"), r"variant.*'complex', 'interleaved', 'rotate_half'"),
    (dict(head_dim=8, theta=0.0), "theta"),
    (dict(head_dim=8, theta=-1.0), "theta"),
    (dict(head_dim=8, xpos_scale_base=0.0), "xpos_scale_base"),
    (dict(head_dim=8, xpos_scale_base=-512.0), "xpos_scale_base"),
    (dict(head_dim=8, scaling={"type": "linear", "factor": 0.0}), "factor"),
    (dict(head_dim=8, scaling={"type": "yarn", "factor": -2.0, "original_max_position": 64}), "factor"),
    (dict(head_dim=8, scaling={"type": "ntk_by_parts", "factor": 2.0}), r"scaling.type.*'yarn'"),
    (dict(head_dim=8, scaling={"type": "yarn", "factor": 2.0}), "original_max_position"),
    (dict(head_dim=8, scaling={"type": "llama3", "factor": 2.0}), "original_max_position"),
    (dict(head_dim=8, scaling={"type": "dynamic_ntk", "factor": 2.0}), "original_max_position"),
    (dict(head_dim=8, scaling={"type": "llama3", "factor": 8.0, "original_max_position": 64,
                               "low_freq_factor": 2.0, "high_freq_factor": 2.0}), "high_freq_factor"),
    (dict(head_dim=2, scaling={"type": "ntk", "factor": 2.0}), "rotary_dim"),
])
def test_invalid_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(**kwargs)


def test_positions_are_checked():
    rope = RotaryEmbedding(8)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="non-negative"):
        rope(q, q, positions=torch.tensor([-1, 0, 1, 2]))
    with pytest.raises(ValueError, match="key_positions"):
        rope(q, q, key_positions=torch.arange(3))


# ----------------------------------------------------------------------------------------------
# Learned relative biases (T5, KERPLE) and p-RoPE


def test_t5_buckets_by_hand_and_against_transformers():
    # 32 buckets, max_distance 128: exact below 16, then 16 + floor(log(n/16) / log(8) · 16), capped at 31
    distances = torch.tensor([-5, 0, 1, 15, 16, 17, 31, 32, 64, 127, 128, 1000])
    by_hand = [0, 0, 1, 15, 16, 16, 21, 21, 26, 31, 31, 31]
    for n, bucket in zip(distances.tolist(), by_hand):
        if n >= 16:
            assert bucket == min(31, 16 + int(math.log(n / 16) / math.log(8) * 16))
    assert t5_bucket(distances, 32, 128).tolist() == by_hand
    transformers = pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = -torch.arange(0, 3000)[None]  # key − query, as HF takes it: past keys are negative
    for buckets, max_distance in ((32, 128), (16, 64), (8, 20)):
        theirs = T5Attention._relative_position_bucket(relative, bidirectional=False, num_buckets=buckets,
                                                       max_distance=max_distance)
        assert torch.equal(t5_bucket(-relative, buckets, max_distance), theirs)
    del transformers


def test_t5_bias_is_its_table_at_the_bucket_and_relative():
    t5 = T5Bias(4, num_buckets=8, max_distance=20)
    positions = torch.arange(30)[None]
    bias = t5.attention_bias(positions, positions)
    assert bias.shape == (1, 4, 30, 30)
    for i, j in ((0, 0), (5, 2), (29, 0), (10, 9)):
        torch.testing.assert_close(bias[0, :, i, j], t5.table.weight[t5_bucket(torch.tensor(i - j), 8, 20)])
    torch.testing.assert_close(t5.attention_bias(positions + 500, positions + 500), bias)
    bias.sum().backward()
    assert t5.table.weight.grad is not None and bool(t5.table.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("kind", ["log", "power"])
def test_kerple_bias_is_its_kernel_of_the_distance(kind):
    torch.manual_seed(0)
    kerple = KerpleBias(3, kind)
    with torch.no_grad():
        kerple.r1.copy_(torch.tensor([0.5, 1.5, 0.001]))  # the last is clamped to 0.01
        kerple.r2.copy_(torch.tensor([0.2, 3.0, 0.7]))  # power: 3.0 is clamped to 2
    positions = torch.arange(12)[None]
    bias = kerple.attention_bias(positions, positions)
    r1, r2 = [0.5, 1.5, 0.01], ([0.2, 3.0, 0.7] if kind == "log" else [0.2, 2.0, 0.7])
    for h in range(3):
        for i, j in ((0, 0), (7, 3), (3, 7), (11, 0)):
            n = abs(i - j)
            expected = -r1[h] * (math.log(1 + r2[h] * n) if kind == "log" else n ** r2[h])
            assert bias[0, h, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(kerple.attention_bias(positions + 1000, positions + 1000), bias)
    bias[0, :2].sum().backward()  # heads whose parameters are inside the clamp get gradients
    assert bool((kerple.r1.grad[:2] != 0).all()) and bool((kerple.r2.grad[0] != 0))


@pytest.mark.parametrize("kind, r1_high, r2_high", [("log", 2.0, 1.0), ("power", 1.0, 2.0)])
def test_kerple_initialisation_is_the_references(kind, r1_high, r2_high):
    """chijames/KERPLE, ParallelKerpleLog: a ~ U(0, 2), c ~ U(0, 1); ParallelKerplePower: the multiplier
    a ~ U(0, 1), the exponent p ~ U(0, 2). 4096 heads draw each range's extremes close to its ends."""
    torch.manual_seed(0)
    kerple = KerpleBias(4096, kind)
    for values, high in ((kerple.r1, r1_high), (kerple.r2, r2_high)):
        assert 0 <= float(values.min()) < 0.01 * high
        assert 0.99 * high < float(values.max()) <= high
        assert float(values.mean()) == pytest.approx(high / 2, rel=0.05)


def fire_by_hand(fire: FireBias, i: int, j: int) -> list[float]:
    """FIRE's bias per head from the paper's definition, in plain Python: f(ψ(i − j) / ψ(max(L, i))), ψ(x) = log(cx + 1)."""
    c, threshold = fire.c.item(), abs(fire.threshold_multiplier.item() * fire.init_threshold.item())
    x = math.log(abs(c * (i - j)) + 1) / (math.log(abs(c * max(i, threshold)) + 1) + 1e-6)
    first, second = fire.mlp[0], fire.mlp[2]
    hidden = [max(0.0, w * x + b) for w, b in zip(first.weight[:, 0].tolist(), first.bias.tolist())]
    return [sum(h * w for h, w in zip(hidden, row)) + b for row, b in zip(second.weight.tolist(), second.bias.tolist())]


def test_fire_bias_is_its_mlp_of_the_normalised_distance():
    torch.manual_seed(0)
    fire = FireBias(3, mlp_width=8, init_c=0.3, init_threshold=16.0)
    with torch.no_grad():
        fire.threshold_multiplier.fill_(1.25)  # L = 20
    positions = torch.arange(64)[None]
    bias = fire.attention_bias(positions, positions)
    assert bias.shape == (1, 3, 64, 64) and bias.dtype == torch.float32
    for i, j in ((0, 0), (5, 2), (19, 0), (20, 3), (63, 0), (63, 62), (40, 41)):
        assert bias[0, :, i, j].tolist() == pytest.approx(fire_by_hand(fire, i, j), rel=1e-5, abs=1e-6)


def test_fire_normalisation_keeps_the_mlp_input_in_the_unit_range_and_is_relative_below_the_threshold(monkeypatch):
    """Not relative in general (the normaliser is the query's own position past L); the paper's guarantee instead:
    the farthest key maps to 1 at any length, so the MLP never reads an input it was not trained on."""
    fire = FireBias(2, init_threshold=16.0)
    positions = torch.arange(2048)[None]
    with torch.no_grad():
        x = fire.normalised_distance(positions, positions)[0]
    causal = torch.ones(2048, 2048, dtype=torch.bool).tril()
    assert float(x[causal].min()) == 0.0 and float(x[causal].max()) <= 1.0
    torch.testing.assert_close(x[16:, 0], torch.ones(2032), atol=1e-5, rtol=0)  # i ≥ L: the first key sits at 1
    assert float(x[8, 0]) < 1.0  # below L the normaliser is ψ(L) > ψ(i)
    low = torch.arange(10)[None]
    torch.testing.assert_close(fire.attention_bias(low + 5, low + 5), fire.attention_bias(low, low))
    assert not torch.allclose(fire.attention_bias(low + 100, low + 100), fire.attention_bias(low, low))
    whole = fire.attention_bias(positions[:, :300], positions[:, :300])
    monkeypatch.setattr(FireBias, "HIDDEN_BUDGET", 5000)  # the MLP over blocks of rows gives the same bias
    torch.testing.assert_close(fire.attention_bias(positions[:, :300], positions[:, :300]), whole)


def test_fire_gradients_reach_every_parameter():
    fire = FireBias(2, mlp_width=8, init_threshold=8.0)
    positions = torch.arange(24)[None]  # rows below and above the threshold
    (fire.attention_bias(positions, positions).tril() ** 2).sum().backward()
    for name, parameter in fire.named_parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0, name


def cope_by_hand(embedding: torch.Tensor, q: torch.Tensor, scores: torch.Tensor, npos: int) -> torch.Tensor:
    """CoPE's added logits by loops over (i, j) from the paper: p_ij = Σ_{t=j..i} σ(s_it), clamped to npos − 1,
    q_i·e interpolated between ⌊p⌋ and ⌈p⌉, divided by √d."""
    rows, keys = scores.shape
    out = torch.zeros(rows, keys, dtype=torch.float64)
    for i in range(rows):
        for j in range(keys):
            p = min(sum(1 / (1 + math.exp(-float(s))) for s in scores[i, j:] if s != float("-inf")), npos - 1)
            lo, hi = math.floor(p), math.ceil(p)
            at = lambda n: float(q[i].double() @ embedding[:, n].double())  # noqa: E731
            out[i, j] = ((1 - (p - lo)) * at(lo) + (p - lo) * at(hi)) / math.sqrt(q.shape[-1])
    return out


def test_cope_logits_count_the_gates_from_each_key_to_the_query():
    g = torch.Generator().manual_seed(0)
    cope = ContextPosition(head_dim=4, npos=4)  # few positions: long rows clamp
    with torch.no_grad():
        cope.embedding.copy_(torch.randn(4, 4, generator=g))
    q = torch.randn(1, 2, 7, 4, generator=g)
    scores = torch.randn(1, 2, 7, 9, generator=g).masked_fill(~torch.ones(7, 9, dtype=torch.bool).tril(2), float("-inf"))
    logits = cope.context_logits(q, scores)
    assert logits.shape == (1, 2, 7, 9) and bool(logits.isfinite().all())
    for head in range(2):
        torch.testing.assert_close(logits[0, head].double(), cope_by_hand(cope.embedding.detach(), q[0, head], scores[0, head], 4),
                                   atol=1e-5, rtol=1e-5)
    (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    assert float(cope.embedding.grad.abs().sum()) > 0


def test_cope_gates_reach_the_scores():
    """The interpolation weight carries the gradient to the gates (floor and ceil do not)."""
    cope = ContextPosition(head_dim=4, npos=16)
    with torch.no_grad():
        cope.embedding.copy_(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))
    scores = torch.randn(1, 1, 5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    scores.requires_grad_(True)
    cope.context_logits(torch.randn(1, 1, 5, 4), scores).tril().sum().backward()
    assert bool((scores.grad.tril() != 0).any()) and bool((scores.grad.triu(1) == 0).all())


def test_p_rope_turns_the_highest_frequencies_only():
    """p = 0.5 of head_dim 16: frequencies theta^(−2i/16) for i < 4 on 8 channels; the other 8 carry no position."""
    from minillm.model.config import ModelConfig

    cfg = ModelConfig(d_model=64, n_heads=4, rope=position_config({"variant": "p_rope", "p": 0.5, "theta": 100.0}))
    rope = cfg.rope.build(cfg.shape, cfg.rope_scaling)
    assert rope.rotary_dim == 8 and rope.variant == "rotate_half"
    torch.testing.assert_close(rope.inv_freq, torch.tensor([100.0 ** (-2 * i / 16) for i in range(4)]))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 20, 16, generator=g), torch.randn(1, 2, 20, 16, generator=g)
    q_rot, k_rot = rope(q, k, offset=7)
    assert torch.equal(q_rot[..., 8:], q[..., 8:]) and not torch.allclose(q_rot[..., :8], q[..., :8])


@pytest.mark.parametrize("setting, field", [
    ({"variant": "p_rope", "p": 0.0}, "rope.p"),
    ({"variant": "p_rope", "p": 1.5}, "rope.p"),
    ({"variant": "p_rope", "layout": "spiral"}, "rope.layout"),
    ({"variant": "p_rope", "rotary_dim": 8}, "rope.rotary_dim"),
    ({"variant": "t5", "num_buckets": 1}, "rope.num_buckets"),
    ({"variant": "t5", "max_distance": 10}, "rope.max_distance"),
    ({"variant": "kerple", "kind": "gauss"}, "rope.kind"),
    ({"variant": "fire", "mlp_width": 0}, "rope.mlp_width"),
    ({"variant": "fire", "init_c": 0.0}, "rope.init_c"),
    ({"variant": "fire", "init_c": -0.1}, "rope.init_c"),
    ({"variant": "fire", "init_threshold": -4.0}, "rope.init_threshold"),
    ({"variant": "cope", "npos": 1}, "rope.npos"),
])
def test_bad_encoding_settings_name_themselves(setting, field):
    with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}:"):
        position_config(setting)


def test_p_rope_needs_a_whole_even_number_of_channels():
    from minillm.model.config import ModelConfig

    with pytest.raises(ValueError, match=r"^rope\.p: p·head_dim = 5 must be a positive even number"):
        ModelConfig(d_model=64, n_heads=4, rope=position_config({"variant": "p_rope", "p": 0.3125}))


def test_inv_freq_at_gives_the_frequencies_a_length_is_rotated_with():
    """`inv_freq` holds the frequencies at the training length (L0 = 16) and stays so after longer calls;
    `inv_freq_at(L)` gives those a sequence of L positions is rotated with (dim 8: θ = [1, 0.1, 0.01, 0.001])."""
    plain = [1.0, 0.1, 0.01, 0.001]
    ntk_base = 10000.0 * (2 * 40 / 16 - 1) ** (8 / 6)  # dynamic NTK, factor 2 at L = 40
    # Dynamic YaRN at L = 64, s = 4: correction dims log10(16/(2π·r)) -> ramp [0, 1, 1, 1] (pairs 1-3 divided by s).
    cases = {  # scaling: {length: (inv_freq, attention factor)}
        "dynamic_ntk": ({"type": "dynamic_ntk", "factor": 2.0, "original_max_position": 16},
                        {16: (plain, 1.0), 40: ([ntk_base ** (-i / 4) for i in range(4)], 1.0)}),
        "dynamic_yarn": ({"type": "dynamic_yarn", "original_max_position": 16},
                         {10: (plain, 1.0), 64: ([1.0, 0.025, 0.0025, 0.00025], 0.1 * math.log(4) + 1)}),
        "longrope": ({"type": "longrope", "factor": 4.0, "original_max_position": 16,
                      "short_factor": [1.0, 2.0, 4.0, 8.0], "long_factor": [1.0, 10.0, 100.0, 1000.0]},
                     {16: ([1.0, 0.05, 0.0025, 0.000125], math.sqrt(1.5)),  # sqrt(1 + ln 4 / ln 16)
                      17: ([1.0, 0.01, 1e-4, 1e-6], math.sqrt(1.5))}),
        "linear": ({"type": "linear", "factor": 4.0}, {10: ([0.25, 0.025, 0.0025, 0.00025], 1.0),
                                                       64: ([0.25, 0.025, 0.0025, 0.00025], 1.0)}),  # static
    }
    for name, (params, at) in cases.items():
        rope = RotaryEmbedding(8, "complex", scaling=params)
        at_training_length = rope.inv_freq.clone()
        torch.testing.assert_close(rope.inv_freq_at(16), at_training_length, rtol=0, atol=0)
        for length, (expected, factor) in at.items():
            inv_freq = rope.inv_freq_at(length)
            assert inv_freq.dtype == torch.float32, name
            torch.testing.assert_close(inv_freq, torch.tensor(expected), rtol=1e-6, atol=0, msg=f"{name} at {length}")
            # What the rotation of such a sequence applies: these angles, scaled by that length's factor.
            cos, sin = rotation_of(rope, length)
            expected_cos, expected_sin = expected_rotation(inv_freq.tolist(), length)
            torch.testing.assert_close((cos, sin), (expected_cos * factor, expected_sin * factor), atol=1e-6, rtol=0)
        torch.testing.assert_close(rope.inv_freq, at_training_length, rtol=0, atol=0)  # unchanged by longer calls
    # The dynamic scalings do leave the training-length frequencies past L0.
    assert not torch.allclose(RotaryEmbedding(8, scaling=cases["dynamic_yarn"][0]).inv_freq_at(64), torch.tensor(plain))
