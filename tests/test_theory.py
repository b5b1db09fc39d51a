"""RoPE-base theory against hand values, a brute-force B(m) in numpy, and Men et al.'s table."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from minillm.eval.theory import MIN_BASE_STEP, TheoryMeasurement, critical_dimension, minimum_base, supported_length
from minillm.model.config import ModelConfig


def test_critical_dimension_hand_values():
    d_extra, bound = critical_dimension(128, 10000.0, 4096)  # LLaMA 2 (Liu et al. 2023, sec. 3)
    assert d_extra == 92
    assert bound == pytest.approx(2 * math.pi * 10000 ** (92 / 128)) and 4096 < bound < 4800
    assert critical_dimension(16, 10000.0, 32)[0] == 4  # 2⌈8·log_1e4(32/2π)⌉ = 2⌈1.41⌉
    assert critical_dimension(128, 500000.0, 4096)[0] == 2 * math.ceil(64 * math.log(4096 / (2 * math.pi), 5e5))
    assert critical_dimension(16, 10000.0, 4)[0] == 0  # shorter than one period of the fastest pair


def brute_force_b(rotary_dim: int, theta: float, length: int) -> np.ndarray:
    """B(m) = Σ_i cos(m·θ^(−2i/d)) for m = 0 .. length, in numpy float64."""
    i = np.arange(rotary_dim // 2)
    return np.cos(np.arange(length + 1)[:, None] * theta ** (-2 * i / rotary_dim)[None, :]).sum(-1)


@pytest.mark.parametrize("rotary_dim,theta", [(16, 100.0), (16, 10000.0), (64, 2000.0), (128, 1.2e4)])
def test_supported_length_is_the_last_distance_before_b_turns_negative(rotary_dim, theta):
    limit = 4096
    b = brute_force_b(rotary_dim, theta, limit)
    negative = np.nonzero(b < 0)[0]
    expected = int(negative[0]) - 1 if len(negative) else limit
    assert supported_length(rotary_dim, theta, limit) == expected


@pytest.mark.parametrize("rotary_dim,length", [(16, 32), (16, 512), (64, 1024), (128, 1024), (128, 4096)])
def test_minimum_base_holds_and_the_base_just_below_fails(rotary_dim, length):
    base = minimum_base(rotary_dim, length)
    assert (brute_force_b(rotary_dim, base, length) >= 0).all()
    below = base / (1 + MIN_BASE_STEP)  # the grid point before it
    assert (brute_force_b(rotary_dim, below, length) < 0).any()


def test_minimum_base_grows_with_length():
    for rotary_dim in (16, 64):
        bases = [minimum_base(rotary_dim, 2**k) for k in range(3, 12)]
        assert bases == sorted(bases)  # a longer context is a stricter condition
        assert bases[-1] > 10 * bases[0]


def test_minimum_base_against_men_et_al_table():
    """Men et al. 2024 (arXiv:2405.14591), Table 1, d = 128: 1k 4.3e3, 2k 1.6e4, 4k 2.7e4, 8k 8.4e4."""
    assert minimum_base(128, 1024) == pytest.approx(4.3e3, rel=0.02)
    assert minimum_base(128, 4096) == pytest.approx(2.7e4, rel=0.02)
    assert minimum_base(128, 8192) == pytest.approx(8.4e4, rel=0.02)
    # 2k: the bases that hold are not an interval. The first window starts at 1.16e4; 1.2e4 fails again,
    # and the paper's 1.6e4 lies in a later window.
    assert minimum_base(128, 2048) == pytest.approx(1.16e4, rel=0.01)
    assert supported_length(128, 1.2e4, 2048) < 2048
    assert supported_length(128, 1.6e4, 2048) == 2048


@pytest.mark.parametrize("rope, spectrum", [
    (dict(variant="complex", theta=10000.0), (32, 10000.0)),
    (dict(variant="p_rope", p=0.25, theta=10000.0), (8, 10000.0 ** 0.25)),  # 8 channels at theta^(-2i/32)
    (dict(variant="pope", theta=10000.0), (64, 10000.0)),  # q and k widened to 2·head_dim
])
def test_the_measurement_reads_the_channels_that_turn_as_built(rope, spectrum):
    cfg = ModelConfig(d_model=64, n_heads=2, context_length=64, rope=rope)
    subject = SimpleNamespace(model=SimpleNamespace(cfg=cfg), setting=None)
    [record] = TheoryMeasurement(subject, SimpleNamespace(reachable=[128]), None).derive(None)
    assert (record.rotary_dim, record.theta) == spectrum
    assert (record.critical_dim, record.extrapolation_bound) == critical_dimension(*spectrum, 64)
