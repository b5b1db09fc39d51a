"""FoX, the Forgetting Transformer (Lin et al. 2025, arXiv:2503.02130): the forget gates' bias against the paper's
sum written out entry by entry and against x-transformers' DataDependentAlibi (a test-only dependency), the layer
against an explicit softmax with that bias, blocks of queries, a KV cache, evaluation methods, linear memory.
(Causality, bf16, gradients to every parameter and the YAML are test_registries.py's, for every encoding.)"""

from __future__ import annotations

import pytest
import torch
from test_registries import VOCAB, tokens
from test_registries import tiny as registry_model
import torch.nn.functional as F
from test_attention import LargestTensor

import minillm.model.transformer
from minillm.model.masks import AttentionPlan
from minillm.model.transformer import KVCache, Transformer
from minillm.positions.base import Positions, position_config
from minillm.positions.forgetting import ForgettingConfig
from minillm.positions.methods import attention_method

T = 12


def tiny(seed: int = 0, rope=None, **overrides) -> Transformer:
    """test_registries' model (2 layers, 4 query heads over 2 key/value heads, head_dim 8), rope=fox, T long."""
    return registry_model(rope or position_config("fox"), seed=seed, **{"context_length": T, **overrides})


def paper_bias(gate, x: torch.Tensor) -> torch.Tensor:
    """D_ij = Σ_{l=j+1..i} log f_l, f_l = σ(w_h·x_l + b_h), summed term by term (0 on the diagonal); j > i: −inf."""
    batch, seq, _ = x.shape
    log_f = F.logsigmoid(x @ gate.weight.T + gate.bias)  # (batch, seq, heads)
    bias = torch.full((batch, gate.weight.shape[0], seq, seq), float("-inf"))
    for i in range(seq):
        for j in range(i + 1):
            bias[:, :, i, j] = log_f[:, j + 1:i + 1].sum(1)
    return bias


def explicit_attention(attention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d + D) v per head, q, k, v from the fused projection, grouped key/value heads; then W_o."""
    batch, seq, _ = x.shape
    heads, kv_heads, dim = attention.n_heads, attention.kv_heads, attention.head_dim
    q, k, v = (x @ attention.qkv.weight.T).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q = q.view(batch, seq, heads, dim).transpose(1, 2)
    k, v = (t.view(batch, seq, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    y = ((q @ k.transpose(-1, -2)) / dim ** 0.5 + bias).softmax(-1) @ v
    return y.transpose(1, 2).reshape(batch, seq, heads * dim) @ attention.proj.weight.T


@pytest.mark.parametrize("rows", [None, 5])  # the whole mask in one block; blocks of 5 queries
def test_the_layer_is_softmax_with_the_papers_forget_bias(rows, monkeypatch):
    model = tiny(n_layers=1)
    if rows is not None:  # MASK_BUDGET // (k_len · heads · batch) queries per block
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", rows * T * 4 * 2)
    attention, gate = model.blocks[0].attn, model.position.for_layer(0)
    with torch.no_grad():
        gate.bias.normal_(generator=torch.Generator().manual_seed(4))  # gates away from 1/2, different per head
        x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(2))
        mask = model._mask(Positions.contiguous(0, T, x.device), torch.float32, None, gate, batch=2)
        assert len(mask.spans) == (1 if rows is None else 3)
        ours = attention(x, AttentionPlan(mask=mask, input_bias=gate))
        expected = explicit_attention(attention, x, paper_bias(gate, x))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_the_bias_is_x_transformers_data_dependent_alibi():
    """x-transformers' DataDependentAlibi (lucidrains, x_transformers.py) with the same linear layer: its bias
    c_i − c_j equals the paper's sum on and below the diagonal."""
    DataDependentAlibi = pytest.importorskip("x_transformers.x_transformers").DataDependentAlibi  # the test extra's

    gate = tiny(n_layers=1).position.for_layer(0)
    reference = DataDependentAlibi(32, 4, causal=True)
    with torch.no_grad():
        reference.to_forget_gates[0].weight.copy_(gate.weight)
        reference.to_forget_gates[0].bias.normal_(generator=torch.Generator().manual_seed(5))
        gate.bias.copy_(reference.to_forget_gates[0].bias)
        x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3))
        theirs, ours = reference(x), paper_bias(gate, x)
        increments = gate.token_increments(x)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(theirs[..., causal], ours[..., causal], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(increments, F.logsigmoid(x @ gate.weight.T + gate.bias).transpose(1, 2))


def test_gates_start_as_the_reference_initialises_them_and_the_knob_is_checked():
    model = tiny()
    gate = model.position.for_layer(1)
    assert gate.weight.shape == (4, 32) and torch.equal(gate.bias.detach(), torch.zeros(4))  # FoX's: σ(0) = 1/2
    assert abs(float(gate.weight.detach().std()) - 0.1) < 0.03  # N(0, init_std), as the reference's nn.Linear
    assert torch.equal(tiny(rope=ForgettingConfig(gate_bias_init=5.0)).position.for_layer(0).bias.detach(),
                       torch.full((4,), 5.0))  # x-transformers' start, kept through the model's own init
    assert model.num_params() - tiny(rope=position_config("none")).num_params() == 2 * (4 * 32 + 4)
    with pytest.raises(ValueError, match=r"^rope\.gate_bias_init: must be finite"):
        ForgettingConfig(gate_bias_init=float("inf"))
    assert sorted(tiny(nope_every=2).position.layers) == ["0"]  # a position-free layer has no gate


@pytest.mark.parametrize("budget", [None, 3 * 20 * 4 * 2])  # whole; blocks of 3 queries
def test_decoding_with_a_cache_equals_the_full_forward_and_is_causal(budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", budget)
    model, idx = tiny(attn_gate="elementwise"), tokens(2, 20)
    changed = idx.clone()
    changed[:, 11:] = (changed[:, 11:] + 1) % VOCAB
    cache, logits, start = KVCache(2), [], 0
    with torch.no_grad():
        full, after = model(idx), model(changed)
        for size in (7, 1, 1, 6, 5):
            logits.append(model(idx[:, start:start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(after[:, :11], full[:, :11], atol=1e-6, rtol=0)
    assert cache.sums[0].shape == (2, 4, 20)


def test_gradients_reach_the_gates_through_blocks(monkeypatch):
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 4 * T * 4 * 2)
    model, idx = tiny().train(), tokens(2, T + 1)
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for layer in ("0", "1"):
        gate = model.position.layers[layer]
        assert gate.weight.grad.abs().max() > 0 and gate.bias.grad.abs().max() > 0


@pytest.mark.parametrize("name", ["self_extend", "sinks", "sliding"])
def test_evaluation_methods_add_the_bias_to_every_part(name):
    """FoX reads no positions, so a method that only moves positions (self_extend) is the plain forward; a window
    (sinks, sliding) changes it past the window only."""
    model, idx = tiny(context_length=8), tokens(1, 30)
    method = attention_method(name)
    with torch.no_grad():
        plain, read = model.hidden_states(idx), model.hidden_states(idx, attention=method)
        cache = KVCache(2)
        decoded = torch.cat([model.hidden_states(idx[:, :9], cache, attention=method)]
                            + [model.hidden_states(idx[:, t:t + 1], cache, attention=method) for t in range(9, 30)], 1)
    torch.testing.assert_close(decoded, read, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(read[:, :4], plain[:, :4], atol=1e-5, rtol=1e-5)
    assert torch.allclose(read, plain, atol=1e-5) == (name == "self_extend")


def test_long_evaluations_hold_no_length_squared_tensor(monkeypatch):
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 2**14)
    model, peaks = tiny(n_layers=1, context_length=8), {}
    for length in (1024, 2048):
        idx = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), LargestTensor() as probe:
            model.token_losses(idx, idx)
        peaks[length] = probe.largest
    assert peaks[2048] <= 2048**2 / 8 and peaks[2048] <= 2.1 * peaks[1024]
