"""FoPE (rope=fope) against the paper's series written out plainly, and the reference's behaviour
(TsinghuaC3I/Fourier-Position-Embedding, olmo/model.py `FourierEmbedding`): sub-critical frequencies zeroed, the
coefficients' initialisation, scalings after the clamp; in the model: causality, cache decoding, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from test_registries import SCALING_NAMES, assert_causal_and_decodes, scaling, tiny, tokens

from minillm.model.config import ModelConfig
from minillm.positions.base import Positions
from minillm.positions.fourier import REFUSED_SCALINGS, FopeConfig, FourierEmbedding
from minillm.positions.scaling import LinearScaling, LongRopeScaling, Scaling, YarnScaling

HEADS, KV_HEADS = 4, 2


def plain_series(model: FourierEmbedding, head: int, position: int) -> tuple[list[float], list[float]]:
    """C_j, S_j of one head at one position, straight from the paper: the frequencies theta^(−2k/F) of period at
    most L, pair j < P the series Σ_k a_kj cos(ω_k n) and Σ_k b_kj sin(ω_k n), every other pair frequency 0."""
    dim, length = model.fourier_dim, model.clamp_length
    omegas = [model.theta ** (-2 * k / dim) for k in range(dim // 2)]
    omegas = [w for w in omegas if 2 * math.pi / w <= length]
    pairs = min(len(omegas), model.head_dim // 4)
    h = head if model.cos_coef.shape[0] > 1 else 0
    cos, sin = [], []
    for j in range(model.head_dim // 2):
        if j < pairs:
            cos.append(sum(float(model.cos_coef[h, k, j]) * math.cos(w * position) for k, w in enumerate(omegas)))
            sin.append(sum(float(model.sin_coef[h, k, j]) * math.sin(w * position) for k, w in enumerate(omegas)))
        else:
            cos.append(1.0)
            sin.append(0.0)
    return cos, sin


def plain_turn(x: torch.Tensor, cos: list[float], sin: list[float]) -> torch.Tensor:
    """(x_i, x_{i+d/2}) -> (x_i C_i − x_{i+d/2} S_i, x_{i+d/2} C_i + x_i S_i), channel by channel."""
    half = len(cos)
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(half):
        out[i] = x[i] * cos[i] - x[i + half] * sin[i]
        out[i + half] = x[i + half] * cos[i] + x[i] * sin[i]
    return out


@pytest.mark.parametrize("settings", [dict(), dict(fourier_dim=32, separate_heads=False, separate_basis=False)],
                         ids=["reference_defaults", "shared_extra_frequencies"])
def test_scores_equal_the_papers_series_under_grouped_query_heads(settings):
    """Each query head turned by its own series, each key by its group's first head's (the reference is multi-head:
    there the two coincide); 5 frequencies turn within L = 64, so 4 pairs (head_dim/4) carry a series."""
    model = FourierEmbedding(16, HEADS, 64, theta=100.0, **settings)
    assert model.pairs == 4
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, HEADS, 3, 16, generator=g), torch.randn(1, KV_HEADS, 5, 16, generator=g)
    query_at, key_at = torch.tensor([70, 71, 200]), torch.tensor([0, 1, 9, 70, 200])
    q_turned, k_turned = model.rotation(Positions.of(query_at, key_at))(q, k)
    groups = HEADS // KV_HEADS
    for h in range(HEADS):
        kv = h // groups
        for a, m in enumerate(query_at.tolist()):
            for b, n in enumerate(key_at.tolist()):
                q_plain = plain_turn(q[0, h, a].double(), *plain_series(model, h, m))
                k_plain = plain_turn(k[0, kv, b].double(), *plain_series(model, kv * groups, n))
                assert float(q_turned[0, h, a] @ k_turned[0, kv, b]) == pytest.approx(float(q_plain @ k_plain),
                                                                                      abs=2e-5, rel=1e-5)


def test_sub_critical_frequencies_are_zeroed_and_their_pairs_carry_no_position():
    """head_dim 64, L 512, theta 10^4 (the paper's 60M model): 16 of RoPE's 32 frequencies turn within 512
    positions; the other 16 pairs are left as they are at every position."""
    model = FourierEmbedding(64, 8, 512)
    rope = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert model.pairs == 16 and len(model.frequencies) == 16
    torch.testing.assert_close(model.frequencies, rope[rope >= 2 * math.pi / 512].float())
    assert bool((2 * math.pi / rope[16:] > 512).all())  # every clamped one a period longer than training
    x = torch.zeros(1, 8, 3, 64)
    x[..., 16:32], x[..., 48:] = torch.randn(1, 8, 3, 16), torch.randn(1, 8, 3, 16)  # pairs 16..31 only
    turned, _ = model.rotation(Positions.of(torch.tensor([0, 100, 5000])))(x, x)
    torch.testing.assert_close(turned, x)


def test_coefficients_start_as_the_reference_initialises_them():
    """The identity spread over the frequencies plus xavier-normal noise of gain 0.3, its σ from torch's fans of
    the reference's tensor: (heads, D, P) per head, (D, P) shared; separate cos and sin draws."""
    torch.manual_seed(0)
    per_head = FourierEmbedding(64, 8, 512)  # D = P = 16: the identity
    shared = FourierEmbedding(64, 8, 512, separate_heads=False, separate_basis=False)
    for model, reference_shape in ((per_head, (8, 16, 16)), (shared, (16, 16))):
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(reference_shape))
        sigma = 0.3 * math.sqrt(2 / (fan_in + fan_out))
        noise = model.cos_coef - torch.eye(16)
        assert model.cos_coef.shape == (reference_shape[0] if len(reference_shape) == 3 else 1, 16, 16)
        assert abs(float(noise.mean())) < 3 * sigma / math.sqrt(noise.numel())
        assert float(noise.std()) == pytest.approx(sigma, rel=0.15)
    assert not torch.equal(per_head.cos_coef, per_head.sin_coef) and shared.sin_coef is shared.cos_coef
    # More frequencies than pairs (D = 5, P = 4): the identity steps by ⌈5/4⌉ = 2, so pair 3 starts from noise only.
    model = FourierEmbedding(16, HEADS, 1024, init_gain=1e-9)
    expected = torch.zeros(5, 4)
    expected[0, 0] = expected[2, 1] = expected[4, 2] = 1.0
    torch.testing.assert_close(model.cos_coef, expected.expand(HEADS, 5, 4), atol=1e-7, rtol=0)


def test_model_is_causal_decodes_and_trains_learned_coefficients():
    config = FopeConfig(fourier_dim=16, learned=True)
    model = tiny(config, context_length=64)  # head_dim 8: 3 frequencies turn within 64, 2 pairs carry them
    assert model.position.pairs == 2
    assert_causal_and_decodes(model)
    model.train()
    idx = tokens(2, 17)
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for coefficients in (model.position.cos_coef, model.position.sin_coef):
        assert isinstance(coefficients, torch.nn.Parameter) and coefficients.grad.abs().max() > 0


def test_the_clamp_length_fixes_which_frequencies_turn_whatever_the_context_length():
    """A run fine-tuned at 16 tokens from one trained at 64 keeps its coefficients' shape with rope.clamp_length=64."""
    source, tuned = tiny(FopeConfig(), context_length=64), tiny(FopeConfig(clamp_length=64), context_length=16)
    assert tuned.position.pairs == source.position.pairs == len(source.position.frequencies) == 2  # 1 and 0.1
    assert tiny(FopeConfig(), context_length=16).position.frequencies.shape == (1,)  # 0.1 < 2π/16
    tuned.load_state_dict(source.state_dict())


def test_fixed_coefficients_are_saved_with_the_model_but_not_trained():
    model = tiny(FopeConfig())
    assert not any(name.startswith("position.") for name, _ in model.named_parameters())
    state = model.state_dict()
    assert torch.equal(state["position.cos_coef"], model.position.cos_coef)
    again = tiny(FopeConfig(), seed=5)
    again.load_state_dict(state)
    idx = tokens(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx))


def test_scalings_apply_after_the_clamp_and_share_the_coefficients():
    """The clamp reads the unscaled frequencies (the reference's len_extra_before_clamp off): a scaling moves the
    ones kept, keeps their number, and its attention factor multiplies the tables."""
    model = FourierEmbedding(64, 8, 512)
    linear = model.rescaled(LinearScaling(factor=4.0, original_max_position=512))
    assert linear.cos_coef is model.cos_coef and model.rescaled(Scaling()) is model
    torch.testing.assert_close(linear.frequencies, model.frequencies / 4)
    yarn = model.rescaled(YarnScaling(factor=4.0, original_max_position=512))
    inv_freq, factor = YarnScaling(factor=4.0, original_max_position=512).frequencies(10000.0, 64, 512)
    torch.testing.assert_close(yarn.frequencies, inv_freq[:16].float())
    where = Positions.of(torch.tensor([3, 600]))
    unscaled = FourierEmbedding(64, 8, 512, coefficients=(model.cos_coef, model.sin_coef))
    unscaled.scaling, unscaled._frequencies64 = Scaling(), inv_freq[:16]  # YaRN's frequencies without its factor
    torch.testing.assert_close(yarn.rotation(where).query[0], unscaled.rotation(where).query[0] * factor)


@pytest.mark.parametrize("settings, field", [
    (dict(rope=dict(variant="fope", fourier_dim=7)), r"rope\.fourier_dim"),
    (dict(rope=FopeConfig(fourier_dim=8)), r"rope\.fourier_dim"),
    (dict(rope=dict(variant="fope", init_gain=0.0)), r"rope\.init_gain"),
    (dict(rope=dict(variant="fope", theta=-1.0)), r"rope\.theta"),
    (dict(rope=FopeConfig(), context_length=6), r"model\.context_length"),
    (dict(rope=FopeConfig(clamp_length=6)), r"rope\.clamp_length"),
    (dict(rope=dict(variant="fope", clamp_length=0)), r"rope\.clamp_length"),
    (dict(rope=FopeConfig(), n_heads=16), r"model\.d_model"),
    (dict(rope=FopeConfig(), rope_scaling=LongRopeScaling(factor=4.0, short_factor=[1.0] * 4,
                                                         long_factor=[4.0] * 4)), r"rope_scaling\.type"),
], ids=["odd_fourier_dim", "fourier_dim_not_above_head_dim", "gain", "theta", "no_frequency_turns",
        "clamp_too_short", "clamp_not_positive", "head_dim_2", "longrope"])
def test_bad_knobs_are_refused_by_name(settings, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        ModelConfig(**{**dict(vocab_size=61, context_length=16, d_model=32, n_heads=4), **settings})


@pytest.mark.parametrize("name", SCALING_NAMES)
def test_every_scaling_but_the_refused_ones_runs_causally_and_decodes(name):
    """Each registered scaling (longrope's factors sized for head_dim = 8 channels) is refused by name or serves a model
    that stays causal and decodes through the KV cache."""
    rope_scaling = scaling(name, dim=8, original_max_position=None)
    if name in REFUSED_SCALINGS:
        with pytest.raises(ValueError, match=rf"^rope_scaling\.type: '{name}' does not apply"):
            tiny(FopeConfig(), rope_scaling=rope_scaling)
        return
    model = tiny(FopeConfig(), rope_scaling=rope_scaling)
    assert model.position.scaling.name == name
    assert_causal_and_decodes(model)
