"""PoPE (rope=pope) against its published implementations, PoPE-pytorch and x-transformers (test-only
dependencies), and in the model: softmax scale, grouped-query heads, phase bias, scalings, refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_registries import SCALING_NAMES, assert_causal_and_decodes, scaling, tiny, tokens

from minillm.model.config import ModelConfig
from minillm.positions.base import Positions
from minillm.model.masks import ScoreSet, merged_attention
from minillm.positions.methods import attention_method
from minillm.positions.polar import REFUSED_SCALINGS, PolarEmbedding, PopeConfig
from minillm.positions.scaling import LinearScaling, LongRopeScaling, Scaling, YarnScaling


@pytest.fixture(scope="module")
def pope_pytorch():
    """lucidrains/PoPE-pytorch (the test extra): only the comparisons with it skip without it."""
    return pytest.importorskip("PoPE_pytorch")


@pytest.fixture(scope="module")
def x_transformers():
    """lucidrains/x-transformers (the test extra), likewise."""
    return pytest.importorskip("x_transformers.x_transformers")


HEADS, KV_HEADS, HEAD_DIM, T = 4, 2, 16, 12


def qkv(seed: int = 0, q_len: int = T, k_len: int = T):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, HEADS, q_len, HEAD_DIM, generator=g), torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=g),
            torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=g))


def pair(pope_pytorch, seed: int = 0, **scaling):
    """Ours and PoPE-pytorch's PoPE with the same random phase bias, in [−2π, 0] and beyond it (clamped by both)."""
    ours = PolarEmbedding(HEAD_DIM, HEADS, **scaling)
    bias = torch.empty(HEADS, HEAD_DIM).uniform_(-7.5, 1.0, generator=torch.Generator().manual_seed(seed))
    reference = pope_pytorch.PoPE(HEAD_DIM, heads=HEADS, inv_freqs=ours.inv_freq.clone())
    with torch.no_grad():
        ours.phase_bias.copy_(bias)
        reference.bias.copy_(bias)
    return ours, reference


def test_frequencies_are_the_references(pope_pytorch, x_transformers):
    ours = PolarEmbedding(HEAD_DIM, HEADS, theta=500.0)
    torch.testing.assert_close(ours.inv_freq, pope_pytorch.PoPE(HEAD_DIM, heads=HEADS, theta=500.0).inv_freqs)
    torch.testing.assert_close(ours.inv_freq, x_transformers.PolarEmbedding(HEAD_DIM, HEADS, base=500.0).inv_freq)


def test_attention_equals_pope_pytorch_under_grouped_query_heads(pope_pytorch):
    """Its attention (softmax scale 1/√head_dim, the bias per query head, causal) equals ours: SDPA over the
    widened q, k at its default scale, grouped-query heads."""
    ours, reference = pair(pope_pytorch)
    q, k, v = qkv()
    # Its grouped-query layout tiles the key heads (query head i reads key head i mod kv_heads); SDPA's and ours
    # repeats each (head i reads i // groups): the keys and values are handed over repeated our way.
    k_rep, v_rep = (x.repeat_interleave(HEADS // KV_HEADS, dim=1) for x in (k, v))
    expected = pope_pytorch.flash_attn_with_pope(q, k_rep, v_rep, pos_emb=reference(T), causal=True)
    q_wide, k_wide = ours.rotation(Positions.contiguous(0, T, q.device))(q, k)
    assert q_wide.shape[-1] == k_wide.shape[-1] == 2 * HEAD_DIM and v.shape[-1] == HEAD_DIM
    got = F.scaled_dot_product_attention(q_wide, k_wide, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_logits_equal_the_references_after_a_cache_and_at_given_positions(pope_pytorch):
    """Scores of the last 3 queries over 12 keys (the reference's decoding layout), at arbitrary positions."""
    ours, reference = pair(pope_pytorch, seed=1)
    q, k, _ = qkv(seed=1, q_len=3)
    where = torch.tensor([0, 2, 3, 7, 8, 9, 15, 40, 41, 100, 101, 1000])
    freqs, bias = reference(where.float())
    k_repeated = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    q_ref, k_ref = pope_pytorch.apply_pope_to_qk((freqs, bias), q, k_repeated)
    expected = q_ref @ k_ref.transpose(-1, -2) * HEAD_DIM**-0.5
    q_wide, k_wide = ours.rotation(Positions.of(where[-3:], where))(q, k)
    got = q_wide @ k_wide.repeat_interleave(HEADS // KV_HEADS, dim=1).transpose(-1, -2) / math.sqrt(2 * HEAD_DIM)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_widened_vectors_are_x_transformers_up_to_the_folded_scale(x_transformers):
    """Same layout (magnitude·cos, magnitude·sin): keys equal, queries √2 larger (the softmax scale folded in);
    with a bias, x-transformers turns the keys by it and we the queries by −δ: the logits agree."""
    ours = PolarEmbedding(HEAD_DIM, HEADS)
    reference = x_transformers.PolarEmbedding(HEAD_DIM, HEADS)
    q, k, _ = qkv(seed=2)
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)  # x-transformers' bias is per key head: multi-head here
    where = torch.arange(T) * 3
    freqs, bias = reference(where)
    q_wide, k_wide = ours.rotation(Positions.of(where))(q, k)
    torch.testing.assert_close(k_wide, x_transformers.apply_polar_pos_emb(k, freqs + bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_wide / math.sqrt(2), x_transformers.apply_polar_pos_emb(q, freqs), atol=1e-5,
                               rtol=1e-5)
    with torch.no_grad():
        reference.learned_bias.uniform_(-2 * math.pi, 0.0)
        ours.phase_bias.copy_(reference.learned_bias[:, 0])
    freqs, bias = reference(where)
    expected = x_transformers.apply_polar_pos_emb(q, freqs) @ x_transformers.apply_polar_pos_emb(k, freqs + bias).mT
    q_wide, k_wide = ours.rotation(Positions.of(where))(q, k)
    torch.testing.assert_close(q_wide @ k_wide.mT / math.sqrt(2), expected, atol=1e-4, rtol=1e-5)


def test_scalings_turn_the_phases_and_scale_the_magnitudes_as_for_rope(pope_pytorch):
    """PI divides every θ_c by its factor; YaRN's frequencies are its formula over 2·head_dim channels and its
    temperature multiplies q and k (the logits by its square), as RoPE's tables carry it."""
    linear = PolarEmbedding(HEAD_DIM, HEADS, scaling=LinearScaling(factor=4.0))
    torch.testing.assert_close(linear.inv_freq, PolarEmbedding(HEAD_DIM, HEADS).inv_freq / 4)
    yarn = YarnScaling(factor=4.0, original_max_position=16)
    ours, reference = pair(pope_pytorch, seed=3, scaling=yarn)
    inv_freq, temperature = yarn.frequencies(10000.0, 2 * HEAD_DIM, 16)
    assert temperature > 1
    torch.testing.assert_close(ours.inv_freq, inv_freq.float())
    q, k, _ = qkv(seed=3)
    q_ref, k_ref = pope_pytorch.apply_pope_to_qk(reference(T), q, k.repeat_interleave(2, dim=1))
    q_wide, k_wide = ours.rotation(Positions.contiguous(0, T, q.device))(q, k)
    got = q_wide @ k_wide.repeat_interleave(2, dim=1).mT / math.sqrt(2 * HEAD_DIM)
    torch.testing.assert_close(got, q_ref @ k_ref.mT * HEAD_DIM**-0.5 * temperature**2, atol=1e-4, rtol=1e-5)


def test_rescaled_shares_the_phase_bias_and_none_keeps_the_encoding():
    ours = PolarEmbedding(HEAD_DIM, HEADS, scaling=LinearScaling(factor=2.0, original_max_position=16))
    assert ours.rescaled(Scaling()) is ours
    rescaled = ours.rescaled(YarnScaling(factor=8.0))
    assert rescaled.phase_bias is ours.phase_bias and rescaled.scaling.original_max_position == 16


def test_model_with_a_phase_bias_is_causal_decodes_and_trains_the_bias():
    model = tiny(PopeConfig(bias_uniform_init=True))
    bias = model.position.phase_bias
    assert bool(((bias >= -2 * math.pi) & (bias <= 0)).all()) and bias.abs().min() > 0
    assert_causal_and_decodes(model)
    model.train()
    idx = tokens(2, 17)
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    assert bias.grad is not None and bias.grad.abs().min() > 0  # every head and channel


def test_bias_beyond_its_range_is_clamped_with_no_gradient():
    ours = PolarEmbedding(HEAD_DIM, HEADS)
    q, k, _ = qkv(seed=4)
    where = Positions.contiguous(0, T, q.device)
    at_zero = ours.rotation(where)(q, k)[0]
    with torch.no_grad():
        ours.phase_bias.fill_(0.5)
    above = ours.rotation(where)(q, k)[0]
    torch.testing.assert_close(above, at_zero)
    above.sum().backward()
    assert ours.phase_bias.grad.abs().max() == 0


def test_refuses_longrope_and_the_methods_it_cannot_serve_by_name():
    longrope = LongRopeScaling(factor=4.0, short_factor=[1.0] * 8, long_factor=[4.0] * 8)
    with pytest.raises(ValueError, match=r"^rope_scaling\.type: 'longrope' does not apply to rope=pope"):
        ModelConfig(vocab_size=61, context_length=16, d_model=32, n_heads=4, rope=PopeConfig(), rope_scaling=longrope)
    with pytest.raises(ValueError, match=r"^scaling: 'longrope' does not apply"):
        PolarEmbedding(HEAD_DIM, HEADS).rescaled(longrope)
    with pytest.raises(ValueError, match=r"^rope\.theta:"):
        PopeConfig(theta=0.0)


@pytest.mark.parametrize("name", ["self_extend", "rerope", "leaky_rerope", "lm_infinite", "sinks"])
def test_methods_merged_by_log_sum_exp_serve_the_widened_keys(name):
    """Their parts go through attention_with_lse, whose explicit path takes q and k wider than v: at 3 tokens every
    method's parts are plain attention (tests/test_registries.py), so the output is the plain forward's; past the
    training length every output is finite."""
    model, idx = tiny(PopeConfig(), context_length=8), tokens(1, 24)
    method = attention_method(name)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(idx[:, :3], attention=method), model.hidden_states(idx[:, :3]),
                                   atol=1e-5, rtol=1e-5)
        assert torch.isfinite(model.hidden_states(idx, attention=method)).all()


def test_score_sets_merged_by_log_sum_exp_equal_one_softmax_with_q_and_k_wider_than_v():
    """Two disjoint sets of keys attended apart and merged = one softmax over their union, q and k 2·head_dim wide."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 6, 2 * HEAD_DIM, generator=generator) for _ in range(2))
    v = torch.randn(1, 2, 6, HEAD_DIM, generator=generator)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    near = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)  # distance < 3
    with torch.no_grad():
        merged = merged_attention(q, k, v, [ScoreSet(None, near), ScoreSet(None, causal & ~near)], None)
    scores = (q @ k.transpose(-1, -2) / (2 * HEAD_DIM) ** 0.5).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(merged, scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def test_single_part_methods_run_through_sdpa_with_the_widened_keys():
    """A sliding window's mask goes to SDPA (by blocks when long) with q, k twice as wide as v."""
    model, idx = tiny(PopeConfig(), context_length=8), tokens(1, 40)
    with torch.no_grad():
        windowed = model.hidden_states(idx, attention=attention_method("sliding"))
        full = model.hidden_states(idx)
    assert torch.isfinite(windowed).all()
    torch.testing.assert_close(windowed[:, :8], full[:, :8])
    assert not torch.allclose(windowed[:, 8:], full[:, 8:], atol=1e-4)


@pytest.mark.parametrize("name", SCALING_NAMES)
def test_every_scaling_but_the_refused_ones_runs_causally_and_decodes(name):
    """Each registered scaling (longrope's factors sized for 2·head_dim = 16 channels) is refused by name or serves
    a model that stays causal and decodes through the KV cache."""
    rope_scaling = scaling(name, dim=16, original_max_position=None)
    if name in REFUSED_SCALINGS:
        with pytest.raises(ValueError, match=rf"^rope_scaling\.type: '{name}' does not apply"):
            tiny(PopeConfig(), rope_scaling=rope_scaling)
        return
    model = tiny(PopeConfig(), rope_scaling=rope_scaling)
    assert model.position.scaling.name == name
    assert_causal_and_decodes(model)
