"""Frequency scalings as classes: checks, evaluation factors, and each one's HF parameters against HF's own formula."""

from __future__ import annotations

import math

import pytest
import torch

from minillm.scaling import (SCALINGS, DynamicNTKScaling, LinearScaling, Llama3Scaling, NTKScaling, Scaling,
                             YarnScaling, rotary_inv_freq, scaling_config)

# One instance of every registered scaling, trained at 64 tokens.
INSTANCES = {
    "none": Scaling(),
    "linear": LinearScaling(factor=4.0),
    "ntk": NTKScaling(factor=4.0),
    "dynamic_ntk": DynamicNTKScaling(factor=2.0, original_max_position=64),
    "yarn": YarnScaling(factor=8.0, original_max_position=64, beta_fast=16.0),
    "llama3": Llama3Scaling(factor=8.0, original_max_position=64),
}


def test_every_registered_scaling_is_covered_here_and_named_by_its_type():
    assert sorted(INSTANCES) == sorted(SCALINGS)
    for name, cls in SCALINGS.items():
        assert cls.name == name and cls().type == name
        assert scaling_config({"type": name}) == cls()


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


@pytest.mark.parametrize("name", sorted(INSTANCES))
def test_hf_parameters_give_hf_the_same_frequencies(name):
    """Each scaling's HF parameters, fed to HF's own rope functions, reproduce its formula (an independent
    implementation): the export of every scaling checks itself."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling, theta, dim, context = INSTANCES[name], 10000.0, 32, 64
    params, max_positions = scaling.hf_parameters(theta, dim, context)
    config = transformers.LlamaConfig(hidden_size=4 * dim, num_attention_heads=4, head_dim=dim,
                                      max_position_embeddings=max_positions, rope_parameters=params)
    length = 4 * context  # past the trained length, where dynamic NTK differs from plain RoPE
    if params["rope_type"] == "default":
        hf_inv_freq, hf_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    elif params["rope_type"] == "dynamic":
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=length)
    else:
        hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    ours, factor = scaling.frequencies(theta, dim, length)
    torch.testing.assert_close(ours.float(), hf_inv_freq.float(), rtol=1e-5, atol=0)
    assert math.isclose(factor, hf_factor, rel_tol=1e-9)
