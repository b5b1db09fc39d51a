"""Frequency scalings as classes: checks, evaluation factors, and each one's HF parameters against HF's own formula."""

from __future__ import annotations

import dataclasses
import io
import math
import re

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.positions.resonance import ResonanceScaling
from minillm.positions.scaling import (SCALINGS, DynamicNTKScaling, DynamicYarnScaling, LinearScaling, Llama3Scaling, LongRopeScaling, NTKScaling, Scaling, YarnScaling, rotary_inv_freq, scaling_config)


# One instance of every registered scaling, trained at 64 tokens (rotary dim 32 where a setting needs one).
INSTANCES = {
    "none": Scaling(),
    "linear": LinearScaling(factor=4.0),
    "ntk": NTKScaling(factor=4.0),
    "dynamic_ntk": DynamicNTKScaling(factor=2.0, original_max_position=64),
    "yarn": YarnScaling(factor=8.0, original_max_position=64, beta_fast=16.0),
    "dynamic_yarn": DynamicYarnScaling(original_max_position=64),
    "llama3": Llama3Scaling(factor=8.0, original_max_position=64),
    "longrope": LongRopeScaling(factor=4.0, original_max_position=64, short_factor=[1.0 + i / 32 for i in range(16)],
                                long_factor=[1.0 + i for i in range(16)]),
    "resonance": ResonanceScaling(over="yarn", factor=8.0, original_max_position=64),  # tests/test_resonance.py
}


def raises_naming(field: str):
    """ValueError whose message starts with the setting's name."""
    return pytest.raises(ValueError, match=rf"^{re.escape(field)}:")


def test_every_registered_scaling_has_an_instance_here():
    """Each one's HF parameters are checked below on these instances; what every scaling must satisfy (names,
    frequency tables, factor 1 as no scaling, its YAML) is in test_registries.py."""
    assert sorted(INSTANCES) == sorted(SCALINGS)


def test_rotary_inv_freq_by_hand():
    torch.testing.assert_close(rotary_inv_freq(10000.0, 8), torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64))


def test_trained_at_fills_only_a_missing_length():
    assert YarnScaling().trained_at(256).original_max_position == 256
    assert YarnScaling(original_max_position=64).trained_at(256).original_max_position == 64
    with pytest.raises(ValueError, match="original_max_position"):
        YarnScaling().frequencies(10000.0, 8, 0)


def test_factor_for_evaluation_lengths():
    assert LinearScaling().factor_for(64, 16) == 4.0
    assert YarnScaling().factor_for(8, 16) == 1.0  # never below 1: no compression at short lengths
    assert DynamicNTKScaling().factor_for(64, 16) == 1.0  # its base follows the length already
    assert DynamicYarnScaling().factor_for(64, 16) == 1.0  # so does its YaRN scale


def test_labels():
    assert Scaling().label == "" and YarnScaling(factor=4.0).label == " +yarn×4"


def test_dynamic_ntk_follows_the_length_and_only_past_the_trained_one():
    scaling = INSTANCES["dynamic_ntk"]
    torch.testing.assert_close(scaling.frequencies(10000.0, 8, 64)[0], rotary_inv_freq(10000.0, 8))
    base = 10000.0 * (2 * 128 / 64 - 1) ** (8 / 6)  # base · (factor·L/L0 − (factor − 1))^(d/(d−2)), L = 2·L0
    torch.testing.assert_close(scaling.frequencies(10000.0, 8, 128)[0], rotary_inv_freq(base, 8))
    assert scaling.dynamic and not LinearScaling.dynamic


def test_ntk_needs_more_than_two_rotary_channels():
    with pytest.raises(ValueError, match="rope.rotary_dim"):
        NTKScaling().check_dim(2)
    NTKScaling().check_dim(4)


# ----------------------------------------------------------------------------------------------
# YaRN as real configurations use it: DeepSeek's mscale pair, gpt-oss's untruncated ramp


def test_yarn_temperature_by_hand():
    ln40 = math.log(40.0)
    assert YarnScaling(factor=40.0).temperature == pytest.approx(0.1 * ln40 + 1)  # ≈ 1.369
    # DeepSeek-V2 (mscale = mscale_all_dim = 0.707) and V3 (both 1): the ratio of two temperatures, exactly 1.
    assert YarnScaling(factor=40.0, mscale=0.707, mscale_all_dim=0.707).temperature == 1.0
    assert YarnScaling(factor=40.0, mscale=1.0, mscale_all_dim=1.0).temperature == 1.0
    assert YarnScaling(factor=40.0, mscale=0.707, mscale_all_dim=1.0).temperature == \
        pytest.approx((0.0707 * ln40 + 1) / (0.1 * ln40 + 1), rel=1e-12)  # ≈ 0.921
    # An explicit attention factor wins over mscale (as in HF); no extension, no temperature.
    assert YarnScaling(factor=40.0, mscale=0.707, mscale_all_dim=1.0, attention_factor=1.5).temperature == 1.5
    assert YarnScaling(factor=1.0, mscale=0.707, mscale_all_dim=1.0).temperature == 1.0


def test_yarn_untruncated_ramp_by_hand():
    """d = 8, θ = 10^4: the correction dim d·ln(L0/(2π·r))/(2 ln θ) is log10(L0/(2π·r)); truncate=False keeps
    the ramp's ends where they fall (1.008 and 2.513) instead of rounding them out to 1 and 3."""
    low, high = math.log10(2048 / (2 * math.pi * 32)), math.log10(2048 / (2 * math.pi))
    theta = [1.0, 0.1, 0.01, 0.001]
    ramp = [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(4)]  # [0, 0, 0.66, 1]
    expected = torch.tensor([t * (1 - r) + t / 4 * r for t, r in zip(theta, ramp)], dtype=torch.float64)
    scaling = YarnScaling(factor=4.0, original_max_position=2048, truncate=False)
    assert scaling.correction_range(10000.0, 8) == pytest.approx((low, high), rel=1e-12)
    torch.testing.assert_close(scaling.frequencies(10000.0, 8, 0)[0], expected, rtol=1e-12, atol=0)
    truncated = YarnScaling(factor=4.0, original_max_position=2048).frequencies(10000.0, 8, 0)[0]
    assert truncated[2].item() == pytest.approx(0.01 * 0.5 + 0.0025 * 0.5)  # ramp 0.5 at i = 2 between 1 and 3
    assert not torch.allclose(truncated, expected)


@pytest.mark.parametrize("build, field", [
    (lambda: YarnScaling(mscale=0.707), "rope_scaling.mscale"),  # HF would ignore a lone mscale
    (lambda: YarnScaling(mscale_all_dim=1.0), "rope_scaling.mscale"),
    (lambda: YarnScaling(mscale=0.0, mscale_all_dim=1.0), "rope_scaling.mscale"),
    (lambda: YarnScaling(mscale=1.0, mscale_all_dim=-1.0), "rope_scaling.mscale_all_dim"),
    (lambda: DynamicYarnScaling(factor=0.5), "rope_scaling.factor"),
    (lambda: DynamicYarnScaling(beta_fast=1.0, beta_slow=2.0), "rope_scaling.beta_fast"),
    (lambda: LongRopeScaling(short_factor=[1.0, 0.0]), "rope_scaling.short_factor"),
    (lambda: LongRopeScaling(long_factor=[]), "rope_scaling.long_factor"),
    (lambda: LongRopeScaling(long_factor=[1.0, float("nan")]), "rope_scaling.long_factor"),
    (lambda: LongRopeScaling(attention_factor=0.0), "rope_scaling.attention_factor"),
    (lambda: LongRopeScaling(factor=0.0), "rope_scaling.factor"),
    (lambda: LongRopeScaling().check_dim(8), "rope_scaling.short_factor"),  # no factors at all
    (lambda: LongRopeScaling(short_factor=[1.0] * 4).check_dim(8), "rope_scaling.long_factor"),
    (lambda: LongRopeScaling(short_factor=[1.0] * 3, long_factor=[2.0] * 4).check_dim(8), "rope_scaling.short_factor"),
    # Through the model's configuration: rotary_dim 32 needs 16 factors.
    (lambda: ModelConfig(rope_scaling=LongRopeScaling(short_factor=[1.0] * 4, long_factor=[2.0] * 4)),
     "rope_scaling.short_factor"),
])
def test_bad_settings_name_themselves(build, field):
    with raises_naming(field):
        build()


# ----------------------------------------------------------------------------------------------
# Dynamic YaRN against the reference implementation


def reference_dynamic_yarn(theta: float, dim: int, original: int, length: int, finetuned: float = 1.0,
                           beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """jquesnelle/yarn `LlamaDynamicYaRNScaledRotaryEmbedding` transcribed in float64: plain RoPE and mscale 1
    (not fine-tuned) or yarn(finetuned) up to max_position_embeddings = finetuned·L0, yarn(L / L0) beyond."""
    max_position_embeddings = finetuned * original
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if length <= max_position_embeddings and finetuned == 1.0:
        return 1.0 / pos_freqs, 1
    scale = length / original if length > max_position_embeddings else finetuned
    low = math.floor(dim * math.log(original / (beta_fast * 2 * math.pi)) / (2 * math.log(theta)))
    high = math.ceil(dim * math.log(original / (beta_slow * 2 * math.pi)) / (2 * math.log(theta)))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    mask = 1 - ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = 1.0 / (scale * pos_freqs) * (1 - mask) + 1.0 / pos_freqs * mask
    return inv_freq, (0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0)


@pytest.mark.parametrize("finetuned, lengths", [(1.0, [1, 32, 64, 65, 100, 256, 1000]), (4.0, [10, 256, 257, 600])])
def test_dynamic_yarn_matches_the_reference_at_every_length(finetuned, lengths):
    scaling = DynamicYarnScaling(factor=finetuned, original_max_position=64)
    plain = rotary_inv_freq(10000.0, 32)
    for length in lengths:
        inv_freq, attention_factor = scaling.frequencies(10000.0, 32, length)
        expected, expected_factor = reference_dynamic_yarn(10000.0, 32, 64, length, finetuned)
        torch.testing.assert_close(inv_freq, expected, rtol=1e-12, atol=0, msg=f"length {length}")
        assert math.isclose(attention_factor, expected_factor, rel_tol=1e-12), length
        # Static YaRN at the scale that length implies: the same frequencies and temperature.
        static_inv_freq, static_factor = YarnScaling(factor=max(finetuned, length / 64),
                                                     original_max_position=64).frequencies(10000.0, 32, 0)
        torch.testing.assert_close(inv_freq, static_inv_freq, rtol=1e-12, atol=0)
        assert attention_factor == static_factor
        # The test has teeth: past L0 (or fine-tuned) the frequencies leave plain RoPE's.
        assert torch.allclose(inv_freq, plain, rtol=1e-9, atol=0) == (finetuned == 1.0 and length <= 64), length
    assert scaling.dynamic


def test_dynamic_yarn_has_no_hf_counterpart():
    with pytest.raises(ValueError, match=r"^rope_scaling\.type='dynamic_yarn' is not LLaMA-compatible \(HF "
                                         r"transformers has no dynamic YaRN"):
        INSTANCES["dynamic_yarn"].hf_parameters(10000.0, 32, 64)


# ----------------------------------------------------------------------------------------------
# LongRoPE


def test_longrope_switches_factors_past_the_trained_length_by_hand():
    """d = 8, θ = [1, 0.1, 0.01, 0.001] divided by λ_i: the short factors up to L0 = 16, the long ones beyond."""
    scaling = LongRopeScaling(factor=4.0, original_max_position=16, short_factor=[1.0, 2.0, 4.0, 8.0],
                              long_factor=[1.0, 10.0, 100.0, 1000.0])
    short = torch.tensor([1.0, 0.05, 0.0025, 0.000125], dtype=torch.float64)
    long = torch.tensor([1.0, 0.01, 0.0001, 0.000001], dtype=torch.float64)
    for length, expected in ((0, short), (16, short), (17, long), (1000, long)):
        inv_freq, attention_factor = scaling.frequencies(10000.0, 8, length)
        torch.testing.assert_close(inv_freq, expected, rtol=1e-12, atol=0, msg=f"length {length}")
        assert attention_factor == pytest.approx(math.sqrt(1.5), rel=1e-12)  # sqrt(1 + ln 4 / ln 16), at every length
    assert dataclasses.replace(scaling, attention_factor=1.2).frequencies(10000.0, 8, 17)[1] == 1.2
    assert dataclasses.replace(scaling, factor=1.0).frequencies(10000.0, 8, 17)[1] == 1.0  # no extension
    assert scaling.dynamic and scaling.factor_for(64, 16) == 4.0


def test_longrope_lists_round_trip_through_a_checkpoint():
    """Checkpoints store dataclasses.asdict and load with weights_only=True; Hydra hands lists over as ListConfig."""
    from omegaconf import OmegaConf

    scaling = INSTANCES["longrope"]
    buffer = io.BytesIO()
    torch.save({"rope_scaling": dataclasses.asdict(scaling)}, buffer)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)["rope_scaling"]
    assert type(stored["long_factor"]) is list and scaling_config(stored) == scaling
    from_hydra = scaling_config({**dataclasses.asdict(scaling), "short_factor": OmegaConf.create(scaling.short_factor)})
    assert from_hydra == scaling and type(from_hydra.short_factor) is list
    assert scaling_config({"type": "longrope", "short_factor": [1, 2], "long_factor": [3, 4]}).long_factor == [3.0, 4.0]


# ----------------------------------------------------------------------------------------------
# Against HF transformers' ROPE_INIT_FUNCTIONS


def hf_rope(config, rope_type: str, length: int) -> tuple[torch.Tensor, float]:
    """HF's (inv_freq, attention_factor) for a sequence of `length` positions, as HF's rotary module computes it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    # dynamic NTK and LongRoPE read the length (HF's forward passes it when it updates them); the others ignore it
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=length)


# Parameter sets beyond each scaling's one instance: every knob HF reads.
VARIANTS = {
    "yarn_mscale": YarnScaling(factor=8.0, original_max_position=64, mscale=0.707, mscale_all_dim=1.0),
    "yarn_attention_factor_over_mscale": YarnScaling(factor=8.0, original_max_position=64, mscale=0.707,
                                                     mscale_all_dim=1.0, attention_factor=1.25),
    "yarn_untruncated": YarnScaling(factor=8.0, original_max_position=64, beta_fast=16.0, truncate=False),
    # The ramp's slow end past the last pair (ceil(16.07) = 17 > 15): HF clamps it to dim − 1, not dim/2 − 1.
    "yarn_ramp_past_the_last_pair": YarnScaling(factor=4.0, original_max_position=65536),
    "longrope_attention_factor": dataclasses.replace(INSTANCES["longrope"], attention_factor=1.1),
}
EXPORTED = {**{k: v for k, v in INSTANCES.items() if k not in ("dynamic_yarn", "resonance")}, **VARIANTS}


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_hf_parameters_give_hf_the_same_frequencies(name):
    """Each scaling's HF parameters, fed to HF's own rope functions, reproduce its formula (an independent
    implementation): the export of every scaling checks itself, below and past the trained length."""
    transformers = pytest.importorskip("transformers")

    scaling, theta, dim, context = EXPORTED[name], 10000.0, 32, 64
    params, max_positions = scaling.hf_parameters(theta, dim, context)
    config = transformers.LlamaConfig(hidden_size=4 * dim, num_attention_heads=4, head_dim=dim,
                                      max_position_embeddings=max_positions, rope_parameters=params)
    for length in (context // 2, 4 * context):  # dynamic NTK and LongRoPE change past the trained length
        hf_inv_freq, hf_factor = hf_rope(config, params["rope_type"], length)
        ours, factor = scaling.frequencies(theta, dim, length)
        torch.testing.assert_close(ours, hf_inv_freq.double(), rtol=1e-6, atol=0)
        assert math.isclose(factor, hf_factor, rel_tol=0, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------
# The parameter sets real models ship, as their config.json builds HF's config

# Phi-3.5-mini-instruct's config.json (microsoft/Phi-3.5-mini-instruct): head_dim 96, so 48 factors each.
PHI35_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
PHI35_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]


# name: (HF config class, its config.json's fields, our scaling, theta, rotary dim)
REAL_MODELS = {
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
        Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192),
        500000.0, 128),
    "deepseek-v3": ("DeepseekV3Config", dict(
        qk_rope_head_dim=64, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "type": "yarn"}),
        YarnScaling(factor=40.0, mscale=1.0, mscale_all_dim=1.0, beta_fast=32.0, beta_slow=1.0,
                    original_max_position=4096), 10000.0, 64),
    "gpt-oss-20b": ("GptOssConfig", dict(
        hidden_size=2880, num_attention_heads=64, head_dim=64, max_position_embeddings=131072, rope_theta=150000,
        rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                      "rope_type": "yarn", "truncate": False}),
        YarnScaling(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False, original_max_position=4096),
        150000.0, 64),
    "phi-3.5-mini": ("Phi3Config", dict(
        hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling={"long_factor": PHI35_LONG_FACTOR, "short_factor": PHI35_SHORT_FACTOR, "type": "longrope"}),
        LongRopeScaling(factor=131072 / 4096, short_factor=PHI35_SHORT_FACTOR, long_factor=PHI35_LONG_FACTOR,
                        original_max_position=4096), 10000.0, 96),
}


@pytest.mark.parametrize("model", sorted(REAL_MODELS))
def test_real_model_scalings_match_hf(model):
    """Our scaling with a shipped model's settings gives the inv_freq and attention factor HF computes from that
    model's own config, at the trained length and past it; our HF parameters give HF the same again."""
    transformers = pytest.importorskip("transformers")

    config_class, fields, scaling, theta, dim = REAL_MODELS[model]
    config = getattr(transformers, config_class)(**fields)
    rope_type = config.rope_parameters["rope_type"]
    # (Llama 3.1 ships max_position_embeddings 131072 for 8 × 8192: llama3 does not read it.)
    params, max_positions = scaling.hf_parameters(theta, dim, scaling.original)
    exported = transformers.LlamaConfig(hidden_size=4 * dim, num_attention_heads=4, head_dim=dim,
                                        max_position_embeddings=max_positions, rope_parameters=params)
    for length in (scaling.original, scaling.original + 1, max_positions):
        ours, factor = scaling.frequencies(theta, dim, length)
        assert ours.shape == (dim // 2,)
        for hf_config in (config, exported):
            hf_inv_freq, hf_factor = hf_rope(hf_config, rope_type, length)
            torch.testing.assert_close(ours, hf_inv_freq.double(), rtol=1e-6, atol=0, msg=f"{model} at {length}")
            assert math.isclose(factor, hf_factor, rel_tol=0, abs_tol=1e-12), (model, length)


def test_real_model_settings_matter():
    """The settings compared above change the frequencies or the temperature well beyond the tolerance."""
    _, _, deepseek, _, _ = REAL_MODELS["deepseek-v3"]
    assert deepseek.temperature == 1.0 and YarnScaling(factor=40.0).temperature > 1.3  # mscale pair: no temperature
    _, _, gpt_oss, theta, dim = REAL_MODELS["gpt-oss-20b"]
    truncated = dataclasses.replace(gpt_oss, truncate=True).frequencies(theta, dim, 0)[0]
    assert ((gpt_oss.frequencies(theta, dim, 0)[0] - truncated).abs() / truncated).max() > 0.1
    _, _, phi, theta, dim = REAL_MODELS["phi-3.5-mini"]
    short, long = phi.frequencies(theta, dim, 4096)[0], phi.frequencies(theta, dim, 4097)[0]
    assert (short / long).max() > 20  # long factors reach 64.8, short ones 2.8
    assert phi.temperature == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))  # sqrt(1 + 5/12)


def test_longrope_temperature_needs_a_trained_length_of_two():
    """sqrt(1 + ln s / ln L0) divides by ln 1 = 0 at L0 = 1: refused naming the setting, unless a factor is given."""
    from minillm.model.config import ModelConfig
    from minillm.positions.scaling import LongRopeScaling

    kwargs = dict(vocab_size=8, context_length=1, d_model=2, n_layers=1, n_heads=1)
    with pytest.raises(ValueError, match="rope_scaling.original_max_position: longrope's temperature"):
        ModelConfig(**kwargs, rope_scaling=LongRopeScaling(short_factor=[1.0], long_factor=[2.0]))
    ModelConfig(**kwargs, rope_scaling=LongRopeScaling(short_factor=[1.0], long_factor=[2.0], attention_factor=1.2))
