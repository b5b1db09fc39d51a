"""Resonance RoPE (rope_scaling=resonance) against the paper's formula (Wang et al. 2024, arXiv:2403.00071,
Algorithm 1), its authors' periodic tables (sheryc/resonance_rope, `compute_freqs`) written here from their
definition, and HF transformers' YaRN for Resonance YaRN; its configuration, checkpoint, evaluation and export.

What every scaling must pass (frequency table, factor 1, causal decoding with a cache, YAML) is in
test_registries.py."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from test_registries import assert_causal_and_decodes, hydra_conf, tiny, tokens

from minillm.model.config import ModelConfig
from minillm.positions.base import Positions
from minillm.positions.resonance import ResonanceScaling, integer_wavelengths
from minillm.positions.rotary import RotaryConfig, RotaryEmbedding
from minillm.positions.scaling import DynamicNTKScaling, LinearScaling, YarnScaling, rotary_inv_freq, scaling_config


def paper_frequencies(inv_freq: np.ndarray) -> np.ndarray:
    """Algorithm 1: λ_i = 2π/θ_i, λ̃_i = round(λ_i), θ̃_i = 2π/λ̃_i, in float64."""
    return 2 * np.pi / np.round(2 * np.pi / inv_freq)


def rope(theta: float, dim: int) -> np.ndarray:
    """θ_i = theta^(−2i/d) (Su et al. 2021, arXiv:2104.09864)."""
    return theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


@pytest.mark.parametrize("theta, dim, trained", [(10000.0, 16, 64), (10000.0, 128, 2048), (500000.0, 64, 256)])
def test_every_wavelength_becomes_the_nearest_whole_number_of_tokens(theta, dim, trained):
    """Below the training length the features repeat exactly every λ̃_i tokens; past it the wavelength moves by at
    most half a token (the paper and its authors' code round every feature)."""
    inv_freq, attention_factor = ResonanceScaling(original_max_position=trained).frequencies(theta, dim, trained)
    expected = paper_frequencies(rope(theta, dim))
    np.testing.assert_allclose(inv_freq.numpy(), expected, rtol=1e-15, atol=0)
    assert attention_factor == 1.0
    wavelength, original = 2 * np.pi / inv_freq.numpy(), 2 * np.pi / rope(theta, dim)
    np.testing.assert_allclose(wavelength, np.round(wavelength), rtol=0, atol=1e-9)  # whole tokens, every feature
    assert np.all(np.abs(wavelength - original) <= 0.5 + 1e-9)
    assert np.any(wavelength != original) and (wavelength < trained).sum() >= 2  # the cases have pre-critical ones


def hf_yarn(theta: float, dim: int, factor: float, original: int, **knobs) -> tuple[np.ndarray, float]:
    """HF transformers' own YaRN (inv_freq, attention factor) for these settings, written as a config.json has them."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
              "original_max_position_embeddings": original, **knobs}
    config = transformers.LlamaConfig(hidden_size=4 * dim, num_attention_heads=4, head_dim=dim,
                                      max_position_embeddings=int(factor * original), rope_parameters=params)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    return inv_freq.double().numpy(), attention_factor


@pytest.mark.parametrize("factor, original, knobs", [(4.0, 64, {}), (8.0, 2048, {"beta_fast": 16.0}),
                                                     (16.0, 256, {"beta_slow": 2.0, "truncate": False})])
def test_resonance_yarn_is_transformers_yarn_then_rounded(factor, original, knobs):
    """The paper's Resonance YaRN: YaRN's frequencies first, then the rounding; YaRN's temperature unchanged."""
    theta, dim = 10000.0, 64
    yarn, temperature = hf_yarn(theta, dim, factor, original, **knobs)
    scaling = ResonanceScaling(over={"type": "yarn", **knobs}, factor=factor, original_max_position=original)
    inv_freq, attention_factor = scaling.frequencies(theta, dim, original)
    np.testing.assert_allclose(inv_freq.numpy(), paper_frequencies(yarn), rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(temperature, abs=1e-12)
    assert not np.allclose(inv_freq.numpy(), yarn, rtol=1e-6)  # the rounding did something


def test_resonance_over_linear_ntk_and_dynamic_ntk_rounds_their_formulas():
    theta, dim, trained = 10000.0, 32, 64
    linear = ResonanceScaling(over="linear", factor=4.0, original_max_position=trained)
    np.testing.assert_allclose(linear.frequencies(theta, dim, 0)[0].numpy(), paper_frequencies(rope(theta, dim) / 4),
                               rtol=1e-15)
    ntk = ResonanceScaling(over="ntk", factor=4.0, original_max_position=trained)
    np.testing.assert_allclose(ntk.frequencies(theta, dim, 0)[0].numpy(),
                               paper_frequencies(rope(theta * 4.0 ** (dim / (dim - 2)), dim)), rtol=1e-15)
    # A dynamic scaling's frequencies follow the length: rounded at each length.
    dynamic = ResonanceScaling(over="dynamic_ntk", factor=2.0, original_max_position=trained)
    assert dynamic.dynamic and not linear.dynamic and dynamic.needs_original and not linear.needs_original
    for length in (trained, 4 * trained):
        expected = DynamicNTKScaling(factor=2.0, original_max_position=trained).frequencies(theta, dim, length)[0]
        torch.testing.assert_close(dynamic.frequencies(theta, dim, length)[0], integer_wavelengths(expected))


def authors_angles(inv_freq: np.ndarray, length: int) -> np.ndarray:
    """The authors' tables (sheryc/resonance_rope `compute_freqs`), from their definition: a feature whose rounded
    wavelength λ̃_i fits in the sequence repeats the angles of its first λ̃_i positions; longer ones are t·θ̃_i."""
    wavelength = np.round(2 * np.pi / inv_freq)
    t = np.arange(length, dtype=np.float64)[:, None]
    return np.where(wavelength <= length, (t % wavelength) * inv_freq, t * inv_freq)


@pytest.mark.parametrize("over", ["none", "yarn"])
def test_the_model_rotates_with_the_authors_periodic_tables_past_the_training_length(over):
    """The rotary tables of a model built with Resonance, at 8x its training length, equal the authors' tables
    (angles repeated every λ̃_i tokens) with the attention factor folded in."""
    trained, dim, length = 32, 16, 256
    scaling = ResonanceScaling(over=over, original_max_position=trained)
    rotary = RotaryEmbedding(dim, "complex", 10000.0, scaling=scaling)
    rotation = rotary.rotation(Positions.contiguous(0, length, torch.device("cpu")))
    inv_freq, attention_factor = scaling.frequencies(10000.0, dim, trained)
    angles = authors_angles(inv_freq.numpy(), length)
    cos, sin = (part[0, 0].double().numpy() for part in rotation.query)
    np.testing.assert_allclose(cos, np.cos(angles) * attention_factor, atol=2e-6, rtol=0)
    np.testing.assert_allclose(sin, np.sin(angles) * attention_factor, atol=2e-6, rtol=0)
    # Every feature below the training length takes at position p + λ̃ the values of position p.
    wavelength = np.round(2 * np.pi / inv_freq.numpy()).astype(int)
    for i in np.flatnonzero(wavelength < trained):
        np.testing.assert_allclose(cos[trained:, i], cos[trained - wavelength[i]:length - wavelength[i], i], atol=1e-6)


def test_resonance_yarn_model_is_causal_and_decodes_with_a_cache():
    assert_causal_and_decodes(tiny(RotaryConfig("complex"), rope_scaling=ResonanceScaling(over="yarn", factor=4.0)))


def test_one_factor_and_one_trained_length_for_both_and_labels_that_say_both():
    yarn = ResonanceScaling(over={"type": "yarn", "beta_fast": 16.0}, factor=8.0).trained_at(128)
    assert yarn.rounded_scaling() == YarnScaling(factor=8.0, beta_fast=16.0, original_max_position=128)
    assert ResonanceScaling(over="yarn").rounded_scaling() == YarnScaling()  # its default factor is YaRN's, 4
    assert ResonanceScaling().label == " +resonance" and yarn.label == " +resonance(yarn)×8"
    # Over none the factor scales nothing: evaluation reads the rounding alone at every length.
    assert ResonanceScaling().factor_for(256, 64) == 1.0 and ResonanceScaling(over="yarn").factor_for(256, 64) == 4.0
    assert ResonanceScaling(over="dynamic_yarn").factor_for(256, 64) == 1.0


@pytest.mark.parametrize("settings, field", [
    (dict(over="longrope"), "rope_scaling.over"),  # its factors are searched per model, not set by a factor
    (dict(over="resonance"), "rope_scaling.over"),
    (dict(over="nope"), "rope_scaling.over"),
    (dict(over=3), "rope_scaling.over"),
    (dict(over={"beta_fast": 16.0}), "rope_scaling.over"),  # settings without the scaling's type
    (dict(over={"type": "yarn", "factor": 2.0}), "rope_scaling.over.factor"),  # Resonance's own
    (dict(over={"type": "yarn", "original_max_position": 64}), "rope_scaling.over.original_max_position"),
    (dict(over={"type": "yarn", "beta_fst": 16.0}), "rope_scaling.over.beta_fst"),
    (dict(over={"type": "yarn", "beta_fast": 0.5}), "rope_scaling.over.beta_fast"),
    (dict(over={"type": "llama3", "low_freq_factor": float("nan")}), "rope_scaling.over.low_freq_factor"),
    (dict(over="yarn", factor=0.0), "rope_scaling.factor"),
    (dict(over="dynamic_yarn", factor=0.5), "rope_scaling.factor"),
    (dict(type="yarn"), "rope_scaling.type"),
])
def test_bad_settings_name_themselves(settings, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}:"):
        ResonanceScaling(**settings)


def test_rotary_dim_and_trained_length_checks_are_the_rounded_scalings():
    with pytest.raises(ValueError, match=r"^rope\.rotary_dim:"):
        ModelConfig(rope=RotaryConfig("complex", rotary_dim=2), rope_scaling=ResonanceScaling(over="ntk"))
    with pytest.raises(ValueError, match="needs the trained length"):
        RotaryEmbedding(16, scaling=ResonanceScaling(over="yarn"))
    RotaryEmbedding(16, scaling=ResonanceScaling())  # the rounding alone needs no length


def test_settings_of_the_rounded_scaling_round_trip_through_a_checkpoint(tmp_path):
    config = ModelConfig(context_length=64, rope_scaling=ResonanceScaling(over={"type": "yarn", "beta_fast": 8.0}))
    torch.save(dataclasses.asdict(config), tmp_path / "hparams.pt")
    stored = torch.load(tmp_path / "hparams.pt", weights_only=True)
    assert stored["rope_scaling"]["over"] == {"type": "yarn", "beta_fast": 8.0}
    assert ModelConfig(**stored) == config and config.rope_scaling.original_max_position == 64
    assert scaling_config(stored["rope_scaling"]).rounded_scaling().beta_fast == 8.0


def test_the_command_line_composes_both_forms():
    from hydra import compose

    from minillm.registry import to_run_config

    with hydra_conf():
        by_name = to_run_config(compose("config", overrides=[
            "rope_scaling=resonance", "rope_scaling.over=yarn", "rope_scaling.factor=4"]))
        with_settings = to_run_config(compose("config", overrides=[
            "rope_scaling=resonance", "rope_scaling.over={type: yarn, beta_fast: 16}"]))
    trained = by_name.model.context_length
    assert by_name.model.rope_scaling == ResonanceScaling(over="yarn", factor=4.0, original_max_position=trained)
    assert with_settings.model.rope_scaling.rounded_scaling() == \
        YarnScaling(beta_fast=16.0, original_max_position=trained)


def test_a_bad_knob_on_the_command_line_is_refused_in_one_line_naming_it():
    """What scripts/train.py prints after "error: " (its ConfigError, one line)."""
    from hydra import compose

    from minillm.registry import ConfigError, to_run_config

    with hydra_conf():
        cfg = compose("config", overrides=["rope_scaling=resonance", "rope_scaling.over={type: yarn, beta_fast: 0.5}"])
        with pytest.raises(ConfigError) as refused:
            to_run_config(cfg)
    assert str(refused.value) == "rope_scaling.over.beta_fast: need beta_fast > beta_slow, got 0.5 and 1.0"


def test_evaluation_reads_a_rope_model_as_if_built_with_resonance():
    """scalings=[..., resonance] on a plain RoPE model: the rounding alone, the same logits as that model's weights
    built with rope_scaling=resonance, at 1x and 4x the training length."""
    from minillm.eval.config import EvalConfig
    from minillm.eval.perplexity import scaling_for

    assert EvalConfig(ckpt="-", scalings=["none", "resonance"]).scalings == ["none", "resonance"]
    scaling = scaling_for("resonance", 64, 16, None)
    assert scaling == ResonanceScaling(factor=1.0, original_max_position=16)
    plain, built = tiny(RotaryConfig("complex")), tiny(RotaryConfig("complex"), rope_scaling=ResonanceScaling())
    for length in (16, 64):
        idx = tokens(1, length)
        with torch.no_grad():
            read = plain.hidden_states(idx, scaling=scaling)
            torch.testing.assert_close(read, built.hidden_states(idx), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(plain.hidden_states(idx), read, atol=1e-4)


def test_export_refuses_resonance_by_name():
    pytest.importorskip("transformers")
    from minillm.interop.export import to_hf_llama

    with pytest.raises(ValueError, match=r"^rope_scaling\.type='resonance' is not LLaMA-compatible"):
        to_hf_llama(tiny(RotaryConfig("complex"), rope_scaling=ResonanceScaling(over="yarn")))


def test_rounding_never_moves_a_wavelength_past_a_neighbour():
    """Rounding is monotone: a scaling that never speeds a feature up stays never faster than rounded RoPE."""
    base = integer_wavelengths(rotary_inv_freq(10000.0, 64))
    for scaling in (LinearScaling(factor=2.0), YarnScaling(factor=4.0, original_max_position=64)):
        rounded = integer_wavelengths(scaling.frequencies(10000.0, 64, 64)[0])
        assert bool((rounded <= base).all())


@pytest.mark.parametrize("overrides", [["rope_scaling=resonance", "rope_scaling.over={type: yarn, beta_fast: 8}"],
                                       ["rope_scaling=resonance", "rope_scaling.over={type: linear}"]])
def test_a_resume_asking_the_same_settings_again_keeps_the_run(overrides):
    """What the run wrote to config.yaml, asked again on the command line, is no contradiction."""
    from omegaconf import OmegaConf
    from test_resume import composed, saved_run

    from minillm.registry import ConfigError, to_run_config
    from minillm.train.config import RunConfig
    from minillm.train.resume import resumed, run_config

    saved = saved_run(*overrides)
    merged = resumed(composed(*overrides, "ckpt_path=last"), saved, [*overrides, "ckpt_path=last"],
                     OmegaConf.structured(RunConfig))
    assert run_config(OmegaConf.to_container(merged)).rope_scaling == to_run_config(composed(*overrides)).rope_scaling
    with pytest.raises(ConfigError, match=r"^rope_scaling\.factor: the run was trained with 4\.0"):
        asked = [*overrides, "rope_scaling.factor=2"]
        resumed(composed(*asked), saved, asked, OmegaConf.structured(RunConfig))
