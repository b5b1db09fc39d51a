"""Gated attention (Qiu et al. 2025, arXiv:2505.06708): Y' = Y ⊙ σ(X W_g + b) on each head's attention output,
checked against the paper's formula written out here, with every encoding path, a KV cache and the run config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minillm.model.config import ModelConfig
from minillm.model.masks import AttentionPlan
from minillm.model.transformer import KVCache, Transformer
from minillm.positions.base import position_config
from minillm.positions.methods import attention_method

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB, T = 37, 12


def tiny(gate: str, rope: str = "complex", seed: int = 0, **overrides) -> Transformer:
    """2 layers, 4 query heads over 2 key/value heads (head_dim 8), float32, eval mode."""
    kwargs = dict(vocab_size=VOCAB, context_length=T, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.1,
                  attn_gate=gate, rope=position_config(rope))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**kwargs)).eval()


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def paper_attention(attention, x: torch.Tensor, gate: str) -> torch.Tensor:
    """One layer by the paper's formula, no rotation (rope=none): q, k, v = X W_q, X W_k, X W_v; Y_h =
    softmax(q_h k_hᵀ/√d + causal) v_h per head (key/value heads shared by groups of query heads); Y' = Y ⊙ σ(X W_g + b)
    per head (one scalar) or per channel; out = Y' W_o."""
    seq = x.shape[1]
    heads, kv_heads, dim = attention.n_heads, attention.kv_heads, attention.head_dim
    w_q, w_k, w_v = attention.qkv.weight.split([heads * dim, kv_heads * dim, kv_heads * dim])
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    gates = torch.sigmoid(x @ attention.gate.weight.T + (0 if attention.gate.bias is None else attention.gate.bias))
    outputs = []
    for h in range(heads):
        g = h // (heads // kv_heads)  # the key/value head this query head reads
        q = x @ w_q[h * dim:(h + 1) * dim].T
        k, v = x @ w_k[g * dim:(g + 1) * dim].T, x @ w_v[g * dim:(g + 1) * dim].T
        scores = (q @ k.transpose(-1, -2) / dim ** 0.5).masked_fill(~causal, float("-inf"))
        y = scores.softmax(-1) @ v  # (batch, seq, dim)
        outputs.append(y * (gates[..., h:h + 1] if gate == "headwise" else gates[..., h * dim:(h + 1) * dim]))
    out_bias = 0 if attention.proj.bias is None else attention.proj.bias
    return torch.cat(outputs, dim=-1) @ attention.proj.weight.T + out_bias


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_the_gated_layer_is_the_papers_formula(gate, bias):
    model = tiny(gate, rope="none", bias=bias)
    attention = model.blocks[0].attn
    assert attention.gate.weight.shape == (4 if gate == "headwise" else 32, 32)
    if bias:
        torch.nn.init.normal_(attention.gate.bias, std=0.5)
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = attention(x, AttentionPlan())  # causal, no rotation
        expected = paper_attention(attention, x, gate)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_the_gate_is_initialised_as_every_linear_layer_and_counts_as_matmul_work():
    plain, headwise, elementwise = tiny("none"), tiny("headwise"), tiny("elementwise")
    gate = headwise.blocks[0].attn.gate
    # init_std, as q, k and v (Qwen3-Next's gate rows of q_proj); no bias without model.bias
    assert abs(float(gate.weight.detach().std()) - 0.1) < 0.03 and gate.bias is None
    assert headwise.num_params() - plain.num_params() == 2 * 32 * 4
    assert elementwise.num_params() - plain.num_params() == 2 * 32 * 32
    assert plain.blocks[0].attn.gate is None and "gate=headwise" in headwise.cfg.label


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_the_output_follows_the_gate_and_gradients_reach_it(gate):
    model, idx = tiny(gate), tokens(2, T + 1)
    with torch.no_grad():
        before = model(idx)
        model.blocks[1].attn.gate.weight.mul_(3.0)
        assert (model(idx) - before).abs().max() > 1e-3
    model.train().loss(idx[:, :-1], idx[:, 1:]).backward()
    for block in model.blocks:
        grad = block.attn.gate.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("rope", ["complex", "alibi", "cope", "none"])
@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_decoding_with_a_cache_equals_the_full_forward(gate, rope):
    model, idx = tiny(gate, rope=rope), tokens(2, T)
    cache, logits, start = KVCache(model.cfg.n_layers), [], 0
    with torch.no_grad():
        full = model(idx)
        for size in (5, 1, 1, 5):
            logits.append(model(idx[:, start:start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["self_extend", "sliding"])
def test_an_evaluation_method_reads_a_gated_model_as_a_plain_one_with_the_gate_applied(method):
    """Within the window every method is plain attention; the gate applies on whichever path computed it."""
    model, idx = tiny("elementwise", context_length=8), tokens(1, 30)
    with torch.no_grad():
        read = model.hidden_states(idx, attention=attention_method(method))
        plain = model.hidden_states(idx)
        model.blocks[0].attn.gate.weight.zero_()  # every gate 1/2: the method's output changes
        halved = model.hidden_states(idx, attention=attention_method(method))
    torch.testing.assert_close(read[:, :4], plain[:, :4], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(read).all() and (halved - read).abs().max() > 1e-3


def test_a_bad_gate_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^model\.attn_gate: got 'x', expected one of \['elementwise', 'headwise', "
                                         r"'none'\]"):
        tiny("x")


def test_the_run_config_composes_a_gated_model():
    from hydra import compose, initialize_config_dir

    from minillm.cli import register_configs
    from minillm.registry import to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = to_run_config(compose("config", overrides=["model.attn_gate=headwise", "rope=alibi"]))
    assert run.model.attn_gate == "headwise"
    model = Transformer(ModelConfig.from_dict({**run.model.to_dict(), "vocab_size": 64}))
    assert all(block.attn.gate.out_features == run.model.n_heads for block in model.blocks)
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))).all()
