"""Typed configuration: every invalid setting raises ValueError naming its field; round trips; derived values."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from minillm.data.config import DataConfig, TokenizerConfig
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.base import POSITION_ENCODINGS, PositionConfig, position_config
from minillm.positions.rotary import ROTARY_LAYOUTS, RotaryConfig
from minillm.positions.scaling import (SCALINGS, DynamicNTKScaling, DynamicYarnScaling, LinearScaling, Llama3Scaling, LongRopeScaling, NTKScaling, Scaling, YarnScaling, scaling_config)

ALL_VARIANTS = sorted(POSITION_ENCODINGS)
BASELINES = tuple(name for name in ALL_VARIANTS if name not in ROTARY_LAYOUTS)


def raises_naming(field: str):
    """ValueError whose message starts with the field's name."""
    return pytest.raises(ValueError, match=rf"^{field.replace('.', r'[.]')}\b")


# ----------------------------------------------------------------------------------------------
# Invalid settings


INVALID_MODEL = {
    "vocab_size zero": (dict(vocab_size=0), "model.vocab_size"),
    "context_length zero": (dict(context_length=0), "model.context_length"),
    "d_model negative": (dict(d_model=-8), "model.d_model"),
    "n_layers zero": (dict(n_layers=0), "model.n_layers"),
    "n_heads zero": (dict(n_heads=0), "model.n_heads"),
    "d_model not divisible by n_heads": (dict(d_model=30, n_heads=4), "model.n_heads"),
    "n_heads not divisible by n_kv_heads": (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads"),
    "more kv heads than heads": (dict(n_heads=4, n_kv_heads=8), "model.n_kv_heads"),
    "n_kv_heads zero": (dict(n_kv_heads=0), "model.n_kv_heads"),
    "unknown ffn": (dict(ffn="relu"), "model.ffn"),
    "unknown norm": (dict(norm="batchnorm"), "model.norm"),
    "ffn_hidden zero": (dict(ffn_hidden=0), "model.ffn_hidden"),
    "attn_dropout one": (dict(attn_dropout=1.0), "model.attn_dropout"),
    "resid_dropout negative": (dict(resid_dropout=-0.1), "model.resid_dropout"),
    "norm_eps zero": (dict(norm_eps=0.0), "model.norm_eps"),
    "init_std zero": (dict(init_std=0.0), "model.init_std"),
    "odd head_dim for rotary": (dict(d_model=12, n_heads=4), "model.d_model"),
    "rotary_dim above head_dim": (dict(d_model=64, n_heads=4, rope=RotaryConfig(rotary_dim=32)), "rope.rotary_dim"),
    "scaling on alibi": (dict(rope=position_config("alibi"), rope_scaling=LinearScaling()), "rope_scaling.type"),
    "scaling on learned": (dict(rope={"variant": "learned"}, rope_scaling={"type": "yarn"}), "rope_scaling.type"),
    "unknown scaling type in a dict": (dict(rope_scaling={"type": "ntk_by_parts"}), "rope_scaling.type"),
    "invalid rope dict": (dict(rope={"variant": "complex", "theta": -1.0}), "rope.theta"),
    "invalid scaling dict": (dict(rope_scaling={"type": "linear", "factor": 0.0}), "rope_scaling.factor"),
}


@pytest.mark.parametrize("case", sorted(INVALID_MODEL))
def test_invalid_model_config_names_its_field(case):
    kwargs, field = INVALID_MODEL[case]
    with raises_naming(field):
        ModelConfig(**kwargs)


def test_odd_head_dim_is_fine_without_rotary():
    for variant in (name for name in BASELINES if not POSITION_ENCODINGS[name].rotary):
        assert ModelConfig(d_model=12, n_heads=4, rope=position_config(variant)).head_dim == 3


INVALID_POSITION = {
    "unknown rotary variant": (lambda: RotaryConfig(variant="alibi"), "rope.variant"),
    "another encoding's variant": (lambda: PositionConfig(variant="complex"), "rope.variant"),
    "max_period one": (lambda: position_config({"variant": "sinusoidal", "max_period": 1.0}), "rope.max_period"),
    "theta zero": (lambda: RotaryConfig(theta=0.0), "rope.theta"),
    "theta negative": (lambda: RotaryConfig(theta=-10000.0), "rope.theta"),
    "theta nan": (lambda: RotaryConfig(theta=float("nan")), "rope.theta"),
    "theta infinite": (lambda: RotaryConfig(theta=float("inf")), "rope.theta"),
    "rotary_dim odd": (lambda: RotaryConfig(rotary_dim=7), "rope.rotary_dim"),
    "rotary_dim zero": (lambda: RotaryConfig(rotary_dim=0), "rope.rotary_dim"),
    "rotary_dim negative": (lambda: RotaryConfig(rotary_dim=-2), "rope.rotary_dim"),
    "xpos_scale_base zero": (lambda: RotaryConfig(xpos_scale_base=0.0), "rope.xpos_scale_base"),
    "xpos_scale_base negative": (lambda: RotaryConfig(xpos_scale_base=-512.0), "rope.xpos_scale_base"),
    "xpos_scale_base nan": (lambda: RotaryConfig(xpos_scale_base=float("nan")), "rope.xpos_scale_base"),
}


@pytest.mark.parametrize("case", sorted(INVALID_POSITION))
def test_invalid_position_config_names_its_field(case):
    build, field = INVALID_POSITION[case]
    with raises_naming(field):
        build()


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError) as rotary:
        RotaryConfig(variant="rope")
    assert all(name in str(rotary.value) for name in ROTARY_LAYOUTS)


def test_another_encodings_variant_says_which_group_option_to_choose():
    with raises_naming("rope.variant") as error:
        RotaryConfig(variant="alibi")
    assert "rope=alibi" in str(error.value) and all(name in str(error.value) for name in ROTARY_LAYOUTS)


def test_unknown_variant_in_a_dict_lists_every_encoding():
    with raises_naming("rope.variant") as error:
        ModelConfig(rope={"variant": "rotary"})
    assert all(name in str(error.value) for name in ALL_VARIANTS), str(error.value)


INVALID_SCALING = {
    "factor zero": (lambda: LinearScaling(factor=0.0), "rope_scaling.factor"),
    "factor negative": (lambda: NTKScaling(factor=-2.0), "rope_scaling.factor"),
    "factor nan": (lambda: YarnScaling(factor=float("nan")), "rope_scaling.factor"),
    "factor infinite": (lambda: DynamicNTKScaling(factor=float("inf")), "rope_scaling.factor"),
    "factor zero on none": (lambda: Scaling(factor=0.0), "rope_scaling.factor"),
    "another scaling's type": (lambda: Scaling(type="yarn"), "rope_scaling.type"),
    "unknown type in a dict": (lambda: scaling_config({"type": "rope2"}), "rope_scaling.type"),
    "original_max_position zero": (lambda: Llama3Scaling(original_max_position=0), "rope_scaling.original_max_position"),
    "yarn beta_fast below beta_slow": (lambda: YarnScaling(beta_fast=1.0, beta_slow=32.0), "rope_scaling.beta_fast"),
    "yarn beta_slow zero": (lambda: YarnScaling(beta_slow=0.0), "rope_scaling.beta_slow"),
    "yarn attention_factor zero": (lambda: YarnScaling(attention_factor=0.0), "rope_scaling.attention_factor"),
    "llama3 equal freq factors": (lambda: Llama3Scaling(low_freq_factor=2.0, high_freq_factor=2.0),
                                  "rope_scaling.high_freq_factor"),
    "llama3 low_freq_factor zero": (lambda: Llama3Scaling(low_freq_factor=0.0), "rope_scaling.low_freq_factor"),
}


@pytest.mark.parametrize("case", sorted(INVALID_SCALING))
def test_invalid_scaling_config_names_its_field(case):
    build, field = INVALID_SCALING[case]
    with raises_naming(field):
        build()


@pytest.mark.parametrize("scaling", [NTKScaling(), DynamicNTKScaling()])
def test_ntk_scalings_need_rotary_dim_above_two_in_the_config(scaling):
    with raises_naming("rope.rotary_dim"):
        ModelConfig(d_model=32, n_heads=4, rope=RotaryConfig(rotary_dim=2), rope_scaling=scaling)


@pytest.mark.parametrize("kwargs,field", [
    (dict(rope={"variant": "complex", "thetta": 500000.0}), "rope.thetta"),
    (dict(rope={"variant": "alibi", "theta": 10000.0}), "rope.theta"),
    (dict(rope_scaling={"type": "linear", "beta_fast": 32.0}), "rope_scaling.beta_fast"),
])
def test_unknown_nested_keys_raise_value_error_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", "[.]")):
        ModelConfig(**kwargs)


INVALID_DATA = {
    "empty path": (dict(path=""), "data.path"),
    "val_fraction zero": (dict(val_fraction=0.0), "data.val_fraction"),
    "val_fraction one": (dict(val_fraction=1.0), "data.val_fraction"),
    "val_windows zero": (dict(val_windows=0), "data.val_windows"),
    "batch_size zero": (dict(batch_size=0), "data.batch_size"),
    "long_documents zero": (dict(long_documents=0), "data.long_documents"),
    "num_workers negative": (dict(num_workers=-1), "data.num_workers"),
    "max_documents zero": (dict(max_documents=0), "data.max_documents"),
    "streaming without max_documents": (dict(streaming=True), "data.max_documents"),
}


@pytest.mark.parametrize("case", sorted(INVALID_DATA))
def test_invalid_data_config_names_its_field(case):
    kwargs, field = INVALID_DATA[case]
    with raises_naming(field):
        DataConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(vocab_size=259), "tokenizer.vocab_size"),
    (dict(vocab_size=0), "tokenizer.vocab_size"),
    (dict(min_frequency=0), "tokenizer.min_frequency"),
])
def test_invalid_tokenizer_config_names_its_field(kwargs, field):
    with raises_naming(field):
        TokenizerConfig(**kwargs)


def test_valid_edge_values_are_accepted():
    DataConfig(streaming=True, max_documents=10)
    TokenizerConfig(vocab_size=260, min_frequency=1)
    ModelConfig(n_heads=4, n_kv_heads=1, attn_dropout=0.0, resid_dropout=0.99)
    ModelConfig(d_model=64, n_heads=4, rope=RotaryConfig(rotary_dim=16))  # rotary_dim == head_dim


# ----------------------------------------------------------------------------------------------
# Derived values


def test_derived_properties_hand_checked():
    cfg = ModelConfig(d_model=96, n_heads=6)
    assert (cfg.head_dim, cfg.kv_heads) == (16, 6)
    assert ModelConfig(d_model=96, n_heads=6, n_kv_heads=2).kv_heads == 2
    # swiglu: 8/3 · d rounded up to a multiple of 64; gelu: 4 · d; ffn_hidden overrides both.
    assert ModelConfig(d_model=128, ffn="swiglu").hidden_dim == 384  # 341.3 -> 384
    assert ModelConfig(d_model=96, n_heads=4, ffn="swiglu").hidden_dim == 256  # exactly 256
    assert ModelConfig(d_model=100, n_heads=5, ffn="swiglu").hidden_dim == 320  # 266.7 -> 320
    assert ModelConfig(d_model=128, ffn="gelu").hidden_dim == 512
    assert ModelConfig(d_model=128, ffn="gelu", ffn_hidden=100).hidden_dim == 100
    assert ModelConfig(d_model=128, ffn="swiglu", ffn_hidden=100).hidden_dim == 100


def test_derived_values_are_properties_not_fields():
    cfg = ModelConfig(d_model=64, n_heads=4)
    cfg.d_model = 128
    assert cfg.head_dim == 32 and "head_dim" not in cfg.to_dict()


# ----------------------------------------------------------------------------------------------
# Round trips


ROUND_TRIP = {
    "defaults": ModelConfig(),
    "everything changed": ModelConfig(
        vocab_size=1000, context_length=128, d_model=96, n_layers=3, n_heads=6, n_kv_heads=2, ffn="gelu",
        ffn_hidden=200, norm="layernorm", norm_eps=1e-6, bias=True, qk_norm=True, tie_embeddings=False,
        attn_dropout=0.1, resid_dropout=0.2, init_std=0.01,
        rope=RotaryConfig("rotate_half", theta=500000.0, rotary_dim=8, xpos_scale_base=256.0),
        rope_scaling=YarnScaling(factor=8.0, original_max_position=64, beta_fast=16.0, attention_factor=1.2)),
    **{f"rope {v}": ModelConfig(rope=position_config(v)) for v in BASELINES},
    **{f"scaling {name}": ModelConfig(rope_scaling=cls()) for name, cls in SCALINGS.items() if name != "longrope"},
    # LongRoPE has no default factors: one per frequency of the default model (rotary_dim 32), lists round-tripped.
    "scaling longrope": ModelConfig(rope_scaling=LongRopeScaling(short_factor=[1.0 + i / 16 for i in range(16)],
                                                                 long_factor=[2.0 + i for i in range(16)])),
    "scaling yarn deepseek": ModelConfig(rope_scaling=YarnScaling(factor=40.0, mscale=0.707, mscale_all_dim=0.707,
                                                                  truncate=False)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP))
def test_to_dict_from_dict_round_trips_through_torch_save(case):
    cfg = ROUND_TRIP[case]
    d = cfg.to_dict()
    assert type(d["rope"]) is dict and type(d["rope_scaling"]) is dict  # plain types only
    assert ModelConfig.from_dict(d) == cfg
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": d}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["hyper_parameters"]
    assert loaded == d
    rebuilt = ModelConfig.from_dict(loaded)
    assert rebuilt == cfg
    assert type(rebuilt.rope) is type(cfg.rope) and type(rebuilt.rope_scaling) is type(cfg.rope_scaling)


def test_nested_configs_given_as_plain_dicts():
    cfg = ModelConfig(rope={"variant": "interleaved", "theta": 500.0},
                      rope_scaling={"type": "llama3", "factor": 2.0, "high_freq_factor": 8.0})
    assert cfg.rope == RotaryConfig("interleaved", theta=500.0)
    # the trained length is resolved once, here: the model's own context length unless the scaling names one
    assert cfg.rope_scaling == Llama3Scaling(factor=2.0, high_freq_factor=8.0, original_max_position=cfg.context_length)
    given = ModelConfig(context_length=64, rope_scaling={"type": "yarn", "original_max_position": 32})
    assert given.rope_scaling.original_max_position == 32
    assert ModelConfig(context_length=64, rope_scaling={"type": "none"}).rope_scaling == Scaling()
    assert ModelConfig(rope={"variant": "sinusoidal"}, rope_scaling=None).rope == position_config("sinusoidal")
    assert ModelConfig(rope={}).rope == RotaryConfig()  # the default variant is rotary
    assert position_config(cfg.rope) is cfg.rope and scaling_config(cfg.rope_scaling) is cfg.rope_scaling
    assert scaling_config(None) == Scaling()


def test_a_synthetic_runs_saved_settings_build_again():
    """A run's config.yaml holds data.tasks as plain dicts; read back, as a resume reads it, they build the tasks
    (they were a dict's methods: resuming a synthetic run raised AttributeError)."""
    from omegaconf import OmegaConf

    from minillm.data.synthetic import Copy, Needle
    from minillm.model.config import ModelSettings
    from minillm.train.config import RunConfig
    from minillm.train.resume import run_config

    run = RunConfig(model=ModelSettings(context_length=16), data=DataConfig(path="synthetic", task="copy"))
    run.data.tasks.copy.num_symbols = 8
    saved = OmegaConf.to_container(OmegaConf.structured(run))
    assert isinstance(saved["data"]["tasks"]["copy"], dict)
    assert run_config(saved).data.synthetic_task == Copy(num_symbols=8)
    data = DataConfig(path="synthetic", task="needle", tasks={"needle": {"num_queries": 2}})
    assert data.synthetic_task == Needle(num_queries=2) and data.tasks.copy == Copy()
    with raises_naming("data.tasks.copyy"):
        DataConfig(tasks={"copyy": {}})
    with raises_naming("data.tasks.copy.num_symbol"):
        DataConfig(tasks={"copy": {"num_symbol": 3}})


def test_from_dict_with_an_unknown_key_names_it():
    d = ModelConfig().to_dict()
    d["n_head"] = 4
    with pytest.raises(ValueError, match=r"n_head"):
        ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------
# Property: a configuration that constructs builds a model that runs


ROPES = st.one_of(
    st.builds(position_config, st.sampled_from(BASELINES)),
    st.builds(RotaryConfig, variant=st.sampled_from(ROTARY_LAYOUTS), theta=st.sampled_from([10.0, 10000.0, 1e6]),
              rotary_dim=st.sampled_from([None, 2, 4, 6, 8, 16]), xpos_scale_base=st.sampled_from([None, 4.0, 512.0])),
)
SCALINGS = st.one_of(
    st.just(Scaling()),
    st.builds(LinearScaling, factor=st.sampled_from([0.5, 2.0, 8.0])),
    st.builds(NTKScaling, factor=st.sampled_from([2.0, 8.0])),
    st.builds(DynamicNTKScaling, factor=st.sampled_from([2.0, 8.0])),
    st.builds(YarnScaling, factor=st.sampled_from([2.0, 16.0]), original_max_position=st.sampled_from([None, 3, 64])),
    st.builds(Llama3Scaling, factor=st.sampled_from([2.0, 8.0])),
    st.builds(DynamicYarnScaling, factor=st.sampled_from([1.0, 4.0]), truncate=st.booleans()),
    # Factor lists of 1 to 4 values: the configuration is valid when that is rotary_dim/2.
    st.integers(1, 4).flatmap(lambda n: st.builds(LongRopeScaling, short_factor=st.just([1.0] * n),
                                                  long_factor=st.just([float(2 + i) for i in range(n)]))),
)


@st.composite
def model_configs(draw):
    """Small configurations, some invalid (odd head_dim, kv heads that do not divide, scalings on baselines)."""
    n_heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 10))
    kwargs = dict(
        vocab_size=draw(st.integers(1, 40)), context_length=draw(st.integers(1, 12)),
        d_model=n_heads * head_dim + draw(st.sampled_from([0, 0, 0, 1])), n_layers=draw(st.integers(1, 2)),
        n_heads=n_heads, n_kv_heads=draw(st.sampled_from([None, 1, 2, 3, 4])),
        ffn=draw(st.sampled_from(["swiglu", "gelu"])), ffn_hidden=draw(st.sampled_from([None, 1, 7])),
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])), bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
        attn_gate=draw(st.sampled_from(["none", "headwise", "elementwise"])),
        attn_dropout=draw(st.sampled_from([0.0, 0.5])), resid_dropout=draw(st.sampled_from([0.0, 0.5])),
        rope=draw(ROPES), rope_scaling=draw(SCALINGS))
    try:
        return ModelConfig(**kwargs)
    except ValueError:
        return None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(cfg=model_configs(), seq=st.integers(1, 12), train=st.booleans())
def test_any_valid_config_builds_a_model_that_runs(cfg, seq, train):
    assume(cfg is not None)
    rotary_dim = cfg.rope.rotary_spectrum(cfg.head_dim)[0] if cfg.rope.is_rotary else None
    # A known config gap (test_ntk_scalings_need_rotary_dim_above_two_in_the_config): not drawn here.
    assume(not (cfg.rope_scaling.type in ("ntk", "dynamic_ntk") and rotary_dim is not None and rotary_dim <= 2))
    seq = min(seq, cfg.context_length) if cfg.rope.variant == "learned" else seq
    model = Transformer(cfg).train(train)
    idx = torch.randint(0, cfg.vocab_size, (2, seq))
    logits = model(idx)
    assert logits.shape == (2, seq, cfg.vocab_size) and torch.isfinite(logits).all()
    loss = model.loss(idx, idx)
    loss.backward()
    assert math.isfinite(loss.item())
