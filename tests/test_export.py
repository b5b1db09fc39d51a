"""minillm.export: the exported LlamaForCausalLM computes our logits, for every rotary layout and scaling."""

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minillm.model.config import ModelConfig
from minillm.positions.rotary import RotaryConfig  # noqa: E402
from minillm.positions.base import position_config
from minillm.positions.scaling import (DynamicNTKScaling, DynamicYarnScaling, LinearScaling, Llama3Scaling, LongRopeScaling, NTKScaling, Scaling, YarnScaling)
from minillm.interop.export import rotary_permutation, to_hf_llama  # noqa: E402
from minillm.model.transformer import Transformer  # noqa: E402

LAYOUTS = ["complex", "interleaved", "rotate_half"]
CONTEXT = 16
LONG = 40  # past the training length, where the scalings act
# Logits are O(5) with the weights below; float32 rotary tables built in different orders (HF: float32
# frequencies and angles; ours: float64 cast to float32) differ by ~3e-5 at most.
ATOL = 1e-4

SCALINGS = {
    "none": (Scaling(), 10000.0),
    "linear": (LinearScaling(factor=4.0), 10000.0),
    "ntk": (NTKScaling(factor=4.0), 10000.0),
    "dynamic_ntk": (DynamicNTKScaling(factor=4.0), 10000.0),
    "dynamic_ntk_L0=12": (DynamicNTKScaling(factor=2.0, original_max_position=12), 500.0),
    "yarn": (YarnScaling(factor=4.0), 10000.0),
    "yarn_custom": (YarnScaling(factor=3.0, beta_fast=8.0, beta_slow=0.5, attention_factor=1.3,
                                original_max_position=12), 100.0),
    "llama3": (Llama3Scaling(factor=8.0), 10000.0),
    "llama3_custom": (Llama3Scaling(factor=4.0, low_freq_factor=0.5, high_freq_factor=2.0,
                                    original_max_position=12), 100.0),
    # DeepSeek's temperature ratio (here not 1) and gpt-oss's untruncated ramp.
    "yarn_mscale": (YarnScaling(factor=4.0, mscale=1.0, mscale_all_dim=0.5), 10000.0),
    "yarn_untruncated": (YarnScaling(factor=3.0, truncate=False, original_max_position=12), 100.0),
    # head_dim 16: 8 factors each; lengths 10 and 40 use the short, then the long ones (L0 = 16).
    "longrope": (LongRopeScaling(factor=4.0, short_factor=[1.0, 1.1, 1.2, 1.4, 1.7, 2.0, 2.4, 3.0],
                                 long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 16.0]), 10000.0),
}


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=64, context_length=CONTEXT, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    return ModelConfig(**{**fields, **overrides})


def random_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Weights large enough that attention is sharp and position-dependent; norm gains away from 1 so that
    swapping two norms would show."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(std=1.5 * p.shape[-1] ** -0.5)
    return model


def tokens(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(seed))


def both(model: Transformer, hf, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(idx), hf(idx).logits


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("variant", LAYOUTS)
def test_logits_match(variant, scaling):
    rope_scaling, theta = SCALINGS[scaling]
    tied = LAYOUTS.index(variant) % 2 == 0  # complex and rotate_half tied, interleaved untied
    cfg = tiny_config(rope=RotaryConfig(variant=variant, theta=theta), rope_scaling=rope_scaling,
                      tie_embeddings=tied)
    model = random_model(cfg)
    hf = to_hf_llama(model)
    assert not hf.training and hf.dtype == torch.float32
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    # Short, long, short again: HF's dynamic NTK grows its frequencies, then resets them below L0 (between L0
    # and the longest length seen, HF keeps the grown frequencies where ours follow the length; 10 < L0);
    # LongRoPE switches to its long factors and back.
    for length in (10, LONG, 10):
        ours, theirs = both(model, hf, tokens(length))
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)

    # The comparison has teeth: past the training length the scaling changes the logits well beyond ATOL.
    if scaling != "none":
        unscaled = random_model(tiny_config(rope=RotaryConfig(variant=variant, theta=theta), tie_embeddings=tied))
        with torch.no_grad():
            assert (unscaled(tokens(LONG)) - model(tokens(LONG))).abs().max() > 100 * ATOL


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk"])
@pytest.mark.parametrize("variant", LAYOUTS)
def test_partial_rotary_matches(variant, scaling):
    """rotary_dim < head_dim: HF's `proportional` RoPE (zero frequencies on the unrotated channels)."""
    rope_scaling = SCALINGS[scaling][0]
    model = random_model(tiny_config(rope=RotaryConfig(variant=variant, rotary_dim=8), rope_scaling=rope_scaling))
    hf = to_hf_llama(model)
    assert hf.config.rope_parameters["rope_type"] == "proportional"
    ours, theirs = both(model, hf, tokens(LONG))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_rotary_permutation_values():
    # complex / interleaved pair (2i, 2i+1); HF pairs (j, j + d/2).
    assert rotary_permutation("complex", 8, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert rotary_permutation("interleaved", 8, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert rotary_permutation("rotate_half", 8, 8).tolist() == list(range(8))
    # Partial: rotated pairs land on (j, j + d/2) for j < r/2, the unrotated channels fill the rest.
    assert rotary_permutation("complex", 8, 4).tolist() == [0, 2, 4, 5, 1, 3, 6, 7]
    assert rotary_permutation("rotate_half", 8, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


def test_attention_implementations_agree():
    model = random_model(tiny_config(rope=RotaryConfig(variant="complex"), rope_scaling=YarnScaling(factor=4.0)))
    idx = tokens(LONG)
    ours = model(idx).detach()
    for implementation in ("eager", "sdpa"):
        hf = to_hf_llama(model, attn_implementation=implementation)
        assert hf.config._attn_implementation == implementation
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, ours, atol=ATOL, rtol=0)


def test_config_and_weights():
    cfg = tiny_config(rope=RotaryConfig(variant="rotate_half", theta=10000.0), rope_scaling=NTKScaling(factor=4.0),
                      tie_embeddings=False, norm_eps=1e-6, ffn_hidden=96)
    model = random_model(cfg)
    hf = to_hf_llama(model)
    c = hf.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps) == (4, 2, 16, 1e-6)
    assert c.max_position_embeddings == CONTEXT and not c.tie_word_embeddings
    # Static NTK is plain RoPE with base theta·factor^(d/(d−2)), d = 16.
    assert c.rope_parameters["rope_type"] == "default"
    assert c.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4.0 ** (16 / 14))
    # rotate_half needs no permutation: q rows are ours verbatim; v, norms and head too.
    block, layer = model.blocks[1], hf.model.layers[1]
    assert torch.equal(layer.self_attn.q_proj.weight, block.attn.qkv.weight[:64])
    assert torch.equal(layer.self_attn.v_proj.weight, block.attn.qkv.weight[96:])
    assert torch.equal(layer.mlp.up_proj.weight, block.ffn.up.weight[96:])
    assert torch.equal(layer.post_attention_layernorm.weight, block.ffn_norm.weight)
    assert torch.equal(hf.lm_head.weight, model.head.weight)
    # Copies, not views: training ours further leaves the export alone.
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert not torch.equal(hf.lm_head.weight, model.head.weight)


def test_scaled_config_lengths():
    yarn = to_hf_llama(random_model(tiny_config(rope_scaling=YarnScaling(factor=4.0))))
    assert yarn.config.max_position_embeddings == 4 * CONTEXT
    assert yarn.config.rope_parameters["original_max_position_embeddings"] == CONTEXT
    # No attention_factor in the config: HF derives YaRN's temperature itself.
    assert "attention_factor" not in yarn.config.rope_parameters
    assert yarn.model.rotary_emb.attention_scaling == pytest.approx(0.1 * torch.tensor(4.0).log().item() + 1)
    # gpt-oss's switch, written only when off (HF's default is on); DeepSeek's pair as given.
    untruncated = to_hf_llama(random_model(tiny_config(rope_scaling=SCALINGS["yarn_untruncated"][0])))
    assert untruncated.config.rope_parameters["truncate"] is False
    assert "truncate" not in yarn.config.rope_parameters
    mscale = to_hf_llama(random_model(tiny_config(rope_scaling=SCALINGS["yarn_mscale"][0]))).config.rope_parameters
    assert (mscale["mscale"], mscale["mscale_all_dim"]) == (1.0, 0.5)
    # LongRoPE: factor = max_position_embeddings / original_max_position_embeddings, both lists.
    longrope_scaling = SCALINGS["longrope"][0]
    longrope = to_hf_llama(random_model(tiny_config(rope_scaling=longrope_scaling))).config
    assert (longrope.max_position_embeddings, longrope.rope_parameters["original_max_position_embeddings"]) == \
        (4 * CONTEXT, CONTEXT)
    assert longrope.rope_parameters["rope_type"] == "longrope" and longrope.rope_parameters["factor"] == 4.0
    assert longrope.rope_parameters["short_factor"] == longrope_scaling.short_factor
    assert longrope.rope_parameters["long_factor"] == longrope_scaling.long_factor
    # HF's dynamic NTK reads the trained length from max_position_embeddings.
    dynamic_ntk = DynamicNTKScaling(factor=2.0, original_max_position=12)
    dynamic = to_hf_llama(random_model(tiny_config(rope_scaling=dynamic_ntk)))
    assert dynamic.config.max_position_embeddings == 12


@pytest.mark.parametrize("scaling", ["yarn_custom", "yarn_mscale", "yarn_untruncated", "llama3", "dynamic_ntk",
                                     "longrope"])
def test_save_and_reload(tmp_path, scaling):
    """The rope parameters survive config.json: a reloaded model computes the same logits."""
    rope_scaling, theta = SCALINGS[scaling]
    model = random_model(tiny_config(rope=RotaryConfig(variant="complex", theta=theta), rope_scaling=rope_scaling))
    to_hf_llama(model).save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours, theirs = both(model, reloaded, tokens(LONG))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_save_and_reload_partial(tmp_path):
    model = random_model(tiny_config(rope=RotaryConfig(variant="interleaved", rotary_dim=8),
                                     rope_scaling=LinearScaling(factor=2.0)))
    to_hf_llama(model).save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ours, theirs = both(model, reloaded, tokens(LONG))
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scaling", ["none", "yarn"])
def test_greedy_generation_matches(scaling):
    """HF decodes with its KV cache (keys stored rotated); static scalings make that the same function."""
    model = random_model(tiny_config(rope=RotaryConfig(variant="complex"), rope_scaling=SCALINGS[scaling][0]))
    hf = to_hf_llama(model)
    prompt = tokens(6)
    # An explicit mask: otherwise HF masks every prompt token equal to pad_token_id.
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, min_new_tokens=30,
                      do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(prompt, max_new_tokens=30, temperature=0))
    # Each cached decoding step's logits equal our full forward over the generated sequence.
    with torch.no_grad():
        ours = model(out.sequences)[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ours, atol=ATOL, rtol=0)


INCOMPATIBLE = [
    (dict(norm="layernorm"), "model.norm='layernorm'"),
    (dict(ffn="gelu"), "model.ffn='gelu'"),
    (dict(bias=True), "model.bias=True"),
    (dict(qk_norm=True), "model.qk_norm=True"),
    (dict(rope=position_config("alibi")), "rope.variant='alibi'"),
    (dict(rope=position_config("sinusoidal")), "rope.variant='sinusoidal'"),
    (dict(rope=position_config("learned")), "rope.variant='learned'"),
    (dict(rope=position_config("none")), "rope.variant='none'"),
    (dict(rope=position_config("t5")), "rope.variant='t5'"),
    (dict(nope_every=2), "model.nope_every=2"),
    (dict(attn_temperature="logn"), "model.attn_temperature='logn'"),
    (dict(attn_gate="headwise"), "model.attn_gate='headwise'"),
    (dict(window=4), "model.window=4"),
    (dict(rope=position_config("fox")), "rope.variant='fox'"),
    (dict(rope=position_config("stickbreaking")), "rope.variant='stickbreaking'"),
    (dict(rope=position_config("pope")), "rope.variant='pope'"),
    (dict(rope=position_config("fope")), "rope.variant='fope'"),
    (dict(rope=position_config("kerple")), "rope.variant='kerple'"),
    (dict(rope=position_config("fire")), "rope.variant='fire'"),
    (dict(rope=position_config("cope")), "rope.variant='cope'"),
    (dict(rope=RotaryConfig(xpos_scale_base=512.0)), "rope.xpos_scale_base=512.0"),
    (dict(rope=RotaryConfig(rotary_dim=8), rope_scaling=YarnScaling()), "rope_scaling.type='yarn'"),
    (dict(rope=RotaryConfig(rotary_dim=8), rope_scaling=Llama3Scaling()), "rope_scaling.type='llama3'"),
    (dict(rope=RotaryConfig(rotary_dim=8), rope_scaling=DynamicNTKScaling()), "rope_scaling.type='dynamic_ntk'"),
    (dict(rope=RotaryConfig(rotary_dim=8), rope_scaling=LongRopeScaling(short_factor=[1.0] * 4, long_factor=[2.0] * 4)),
     "rope_scaling.type='longrope'"),
    (dict(rope_scaling=DynamicYarnScaling()), "rope_scaling.type='dynamic_yarn'"),  # HF has no dynamic YaRN
    (dict(rope=RotaryConfig(rotary_dim=2, theta=1e6)), "rope.rotary_dim=2"),  # base 1e6^8 overflows float32
]


@pytest.mark.parametrize("overrides, message", INCOMPATIBLE, ids=[m for _, m in INCOMPATIBLE])
def test_incompatible_settings_raise(overrides, message):
    model = Transformer(tiny_config(**overrides))
    with pytest.raises(ValueError, match="LLaMA|overflows") as error:
        to_hf_llama(model)
    assert message in str(error.value)


def test_missing_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(ImportError, match=r"pip install minillm\[interop\]"):
        to_hf_llama(Transformer(tiny_config()))


@pytest.mark.parametrize("p, layout", [(0.25, "rotate_half"), (0.75, "complex")])
def test_p_rope_exports_to_hf_proportional(p, layout):
    """p-RoPE is HF's `proportional` RoPE: rope_theta = theta, partial_rotary_factor = p; logits equal."""
    cfg = tiny_config(rope=position_config({"variant": "p_rope", "p": p, "layout": layout, "theta": 500.0}))
    model = random_model(cfg)
    hf = to_hf_llama(model)
    params = hf.config.rope_parameters
    assert params["rope_type"] == "proportional" and params["partial_rotary_factor"] == p
    assert params["rope_theta"] == pytest.approx(500.0, rel=1e-9)
    ours, theirs = both(model, hf, tokens(LONG))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
