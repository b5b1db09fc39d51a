"""Stick-breaking attention (Tan et al. 2024, arXiv:2410.17980): the layer against the paper's weights computed by
naive loops (the product over every key in between), blocks of queries, a KV cache, bf16 at length, windows,
linear memory. (Causality, gradients and the YAML for every encoding are test_registries.py's.)"""

from __future__ import annotations

import math

import pytest
import torch
from test_registries import VOCAB, tokens
from test_registries import tiny as registry_model
from test_attention import LargestTensor

import minillm.model.transformer
from minillm.model.masks import AttentionPlan
from minillm.model.transformer import KVCache, Transformer
from minillm.positions.base import Positions, position_config
from minillm.positions.methods import attention_method

T = 9


def tiny(seed: int = 0, rope=None, **overrides) -> Transformer:
    """test_registries' model (2 layers, 4 query heads over 2 key/value heads, head_dim 8), rope=stickbreaking."""
    return registry_model(rope or position_config("stickbreaking"), seed=seed,
                          **{"context_length": T, "init_std": 0.3, **overrides})


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def paper_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(seq, seq) weights of one head, by the definition: A_ij = β_ij Π_{j<m<i} (1 − β_im) for j < i, β = σ(q·k/√d),
    each product taken term by term; the query's own value gets what is left, 1 − Σ_{j<i} A_ij (the reference's
    tests add rem · v)."""
    seq, dim = q.shape
    beta = [[sigmoid(float(q[i] @ k[j]) / math.sqrt(dim)) for j in range(seq)] for i in range(seq)]
    weights = torch.zeros(seq, seq, dtype=torch.float64)
    for i in range(seq):
        for j in range(i):
            product = beta[i][j]
            for m in range(j + 1, i):
                product *= 1 - beta[i][m]
            weights[i, j] = product
        weights[i, i] = 1 - float(weights[i, :i].sum())
    return weights


def paper_layer(attention, x: torch.Tensor) -> torch.Tensor:
    """One layer: q, k, v from the fused projection, key/value heads shared by groups of query heads, the paper's
    weights per head, then W_o (float64)."""
    batch, seq, _ = x.shape
    heads, kv_heads, dim = attention.n_heads, attention.kv_heads, attention.head_dim
    q, k, v = (x.double() @ attention.qkv.weight.double().T).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    out = torch.zeros(batch, seq, heads * dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            g = h // (heads // kv_heads)
            weights = paper_weights(q[b, :, h * dim:(h + 1) * dim], k[b, :, g * dim:(g + 1) * dim])
            out[b, :, h * dim:(h + 1) * dim] = weights @ v[b, :, g * dim:(g + 1) * dim]
    return out @ attention.proj.weight.double().T


@pytest.mark.parametrize("rows", [None, 2])  # every query in one block; blocks of 2 queries
def test_the_layer_is_the_papers_stick_breaking(rows, monkeypatch):
    model = tiny(n_layers=1)
    if rows is not None:  # MASK_BUDGET // (k_len · heads · batch) queries per block
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", rows * T * 4 * 2)
    attention, position = model.blocks[0].attn, model.position
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mask = model._mask(Positions.contiguous(0, T, x.device), torch.float32, None, position, batch=2)
        assert len(mask.spans) == (1 if rows is None else 5)
        ours, expected = attention(x, AttentionPlan(mask=mask, contextual=position)), paper_layer(attention, x)
    torch.testing.assert_close(ours.double(), expected, atol=1e-5, rtol=1e-5)


def test_weights_favour_the_nearest_key_when_scores_tie():
    """Equal scores z: A_ij = σ(z)(1 − σ(z))^(i−1−j), a geometric decay from the query (the paper's recency bias)."""
    scores = torch.zeros(1, 1, 1, 6).masked_fill(torch.tensor([False] * 5 + [True]), float("-inf"))  # keys 0..4
    position = tiny().position
    weights = (scores + position.context_logits(torch.zeros(1, 1, 1, 8), scores)).softmax(-1)[0, 0, 0]
    expected = torch.tensor([0.5 ** 4, 0.5 ** 3, 0.5 ** 2, 0.5, 0.5 ** 4, 0.0])  # key 4 is the query's own: the rest
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("budget", [None, 3 * 20 * 4 * 2])  # whole; blocks of 3 queries
def test_decoding_with_a_cache_equals_the_full_forward(budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", budget)
    model, idx = tiny(attn_gate="headwise"), tokens(2, 20)
    cache, logits, start = KVCache(2), [], 0
    with torch.no_grad():
        full = model(idx)
        for size in (7, 1, 1, 6, 5):
            logits.append(model(idx[:, start:start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=2e-5, rtol=1e-5)


def test_bf16_at_length_is_finite_and_gradients_flow(monkeypatch):
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 64 * 256 * 4)
    model, idx = tiny(init_std=1.0).train(), tokens(1, 257)  # large scores: σ saturates, softplus grows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_sliding_window_breaks_the_stick_over_the_window_only():
    model, idx = tiny(context_length=8), tokens(1, 24)
    with torch.no_grad():
        plain = model.hidden_states(idx)
        sliding = model.hidden_states(idx, attention=attention_method("sliding"))
    torch.testing.assert_close(sliding[:, :8], plain[:, :8], atol=1e-5, rtol=1e-5)
    assert (sliding[:, 8:] - plain[:, 8:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"^attention: self_extend .*counted from the scores"):
        model.hidden_states(idx, attention=attention_method("self_extend"))


def test_long_evaluations_hold_no_length_squared_tensor(monkeypatch):
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 2**14)
    model, peaks = tiny(n_layers=1, context_length=8), {}
    for length in (1024, 2048):
        idx = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), LargestTensor() as probe:
            model.token_losses(idx, idx)
        peaks[length] = probe.largest
    assert peaks[2048] <= 2048**2 / 8 and peaks[2048] <= 2.1 * peaks[1024]
