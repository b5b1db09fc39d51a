"""RoPE windows with NoPE layers (RNoPE-SWA, arXiv:2501.18795; SWAN-GPT, arXiv:2504.08719): the training window of
model.window against a masked softmax written out here, its reach, the NoPE layers' full view, the KV cache, the
gradients, SWAN's log scaling of the NoPE layers' logits against its formula, the knobs, and the run config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from minillm.model import transformer
from minillm.model.config import ModelConfig
from minillm.model.masks import BlockedMask
from minillm.model.transformer import KVCache, Transformer
from minillm.positions.base import Positions, position_config
from minillm.positions.methods import Sliding, Window, attention_method

CONF = Path(__file__).resolve().parents[1] / "conf"
VOCAB, L = 41, 8  # L: the training length


def tiny(rope: str = "complex", seed: int = 0, **overrides) -> Transformer:
    """2 layers of 4 heads (head_dim 8), float32, eval mode; layer 1 position-free unless overridden."""
    kwargs = dict(vocab_size=VOCAB, context_length=L, d_model=32, n_layers=2, n_heads=4, init_std=0.1, nope_every=2,
                  window=3, rope=position_config(rope))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**kwargs)).eval()


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rotate_pairs(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE on adjacent pairs (2i, 2i+1) of x (batch, heads, seq, d) at positions 0..seq−1 (Su et al. 2021,
    arXiv:2104.09864): (x_2i + i·x_2i+1)·e^{i·m·θ^(−2i/d)}, written with complex numbers."""
    seq, dim = x.shape[-2], x.shape[-1]
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def explicit_attention(attention, x: torch.Tensor, window, rotate: bool, scale=None) -> torch.Tensor:
    """One layer written out: q, k, v = x W; softmax(s·q·kᵀ/√d) v over the keys j ≤ i with i − j < window (None: every
    j ≤ i), s the factor on each query row (None: 1); out = y W_o."""
    batch, seq, _ = x.shape
    heads, dim = attention.n_heads, attention.head_dim
    q, k, v = (t.view(batch, seq, heads, dim).transpose(1, 2) for t in (x @ attention.qkv.weight.T).chunk(3, dim=-1))
    if rotate:
        q, k = rotate_pairs(q), rotate_pairs(k)
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    seen = (j <= i) & ((i - j < window) if window is not None else True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    if scale is not None:
        scores = scores * scale[:, None]
    y = scores.masked_fill(~seen, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).reshape(batch, seq, heads * dim) @ attention.proj.weight.T


def explicit_forward(model: Transformer, idx: torch.Tensor, scales=None) -> torch.Tensor:
    """The model's hidden states with every attention written out (explicit_attention), each layer's window and
    rotation read from the config; scales: the factor on each query row of the position-free layers."""
    cfg, x = model.cfg, model.embed(idx)
    for layer, block in enumerate(model.blocks):
        free = cfg.position_free(layer)
        window = cfg.window if cfg.windowed(layer) else None
        x = x + explicit_attention(block.attn, block.attn_norm(x), window, rotate=not free,
                                   scale=scales if free else None)
        x = x + block.ffn(block.ffn_norm(x))
    return model.norm(x)


# ----------------------------------------------------------------------------------------------
# The window


@pytest.mark.parametrize("window_layers", ["positional", "all"])
def test_a_windowed_model_is_the_masked_softmax_written_out(window_layers):
    """RoPE layer windowed, NoPE layer full (positional) or windowed too (all), within and past L."""
    model, idx = tiny(window_layers=window_layers), tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.hidden_states(idx), explicit_forward(model, idx), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("blocked", [False, True])
def test_a_windowed_layer_reads_nothing_beyond_its_window(blocked, monkeypatch):
    """Two windowed layers of W = 3 reach 2(W − 1) = 4 tokens back: token t − 4 changes the output at t, t − 5 does
    not, whether the mask is whole or by blocks of queries (PATTERN_ROWS=4)."""
    if blocked:
        monkeypatch.setattr(transformer, "PATTERN_ROWS", 4)
    model, idx, t = tiny(window_layers="all"), tokens(1, 20), 15
    with torch.no_grad():
        base = model.hidden_states(idx)[0, t]
        for back, changes in ((5, False), (6, False), (4, True)):
            other = idx.clone()
            other[0, t - back] = (idx[0, t - back] + 1) % VOCAB
            moved = (model.hidden_states(other)[0, t] - base).abs().max()
            assert (moved > 1e-4) == changes, (back, float(moved))


def test_the_nope_layers_still_see_every_token():
    """With the RoPE layer windowed to 3 tokens, the full NoPE layer carries token 0 to the last position; with every
    layer windowed, nothing does."""
    idx = tokens(1, 20)
    other = idx.clone()
    other[0, 0] = (idx[0, 0] + 1) % VOCAB
    with torch.no_grad():
        for window_layers, changes in (("positional", True), ("all", False)):
            model = tiny(window_layers=window_layers)
            moved = (model.hidden_states(other)[0, -1] - model.hidden_states(idx)[0, -1]).abs().max()
            assert (moved > 1e-4) == changes, window_layers


def test_a_given_mask_restricts_the_windowed_layers_within_their_window():
    """attention_mask as a bool tensor or as a pattern: the causal one changes nothing; one that hides token 2 from
    every later query hides it from the windowed layer too (the output at 4, within its window, moves)."""
    model, idx, seq = tiny(window_layers="all"), tokens(1, 12), 12
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    hidden = causal.clone()
    hidden[3:, 2] = False
    with torch.no_grad():
        plain = model.hidden_states(idx)
        torch.testing.assert_close(model.hidden_states(idx, attention_mask=causal), plain, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.hidden_states(idx, attention_mask=lambda i, j: j <= i), plain, atol=1e-6,
                                   rtol=0)
        as_tensor = model.hidden_states(idx, attention_mask=hidden)
        as_pattern = model.hidden_states(idx, attention_mask=lambda i, j: (j <= i) & ((j != 2) | (i < 3)))
    torch.testing.assert_close(as_tensor, as_pattern, atol=1e-6, rtol=0)
    torch.testing.assert_close(as_tensor[:, :3], plain[:, :3], atol=1e-6, rtol=0)
    assert (as_tensor[0, 4] - plain[0, 4]).abs().max() > 1e-4


def test_windowed_blocks_cover_only_the_keys_their_queries_see():
    """Cost linear in the length: past PATTERN_ROWS queries the window's mask goes by blocks, each over its rows plus
    W − 1 keys before them, never the causal triangle."""
    model = tiny()
    positions = Positions.contiguous(0, 1000, torch.device("cpu"))
    mask = model._mask(positions, torch.float32, Window(0, 2), model.position.for_layer(0))
    assert isinstance(mask, BlockedMask)
    assert all(len(keys) <= len(rows) + 2 for rows, keys, _ in mask.spans)
    assert sum(len(rows) for rows, _, _ in mask.spans) == 1000


@pytest.mark.parametrize("rope", ["complex", "alibi", "fox", "cope"])
@pytest.mark.parametrize("blocked", [False, True])
def test_decoding_with_a_cache_equals_the_full_forward(rope, blocked, monkeypatch):
    if blocked:
        monkeypatch.setattr(transformer, "PATTERN_ROWS", 4)
    model, idx = tiny(rope, nope_logit_scale="swan"), tokens(2, 22)
    cache, logits, start = KVCache(model.cfg.n_layers), [], 0
    with torch.no_grad():
        full = model(idx)
        for size in (6, 1, 1, 14):
            logits.append(model(idx[:, start:start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=2e-5, rtol=1e-5)


def test_gradients_reach_every_parameter_and_a_few_steps_fit_a_sequence():
    model = tiny(nope_logit_scale="swan").train()
    idx = tokens(4, L + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        if not losses:
            missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing, missing
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# ----------------------------------------------------------------------------------------------
# An evaluation's attention methods


def test_the_windowed_layers_keep_their_window_and_a_method_applies_to_the_others():
    """attention=sliding(3) on a model whose RoPE layer trained with W = 3 reads it as the same weights windowed
    everywhere; the plain method `full` reads it as it is."""
    positional, everywhere, idx = tiny(), tiny(window_layers="all"), tokens(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(positional.hidden_states(idx, attention=Sliding(window=3)),
                                   everywhere.hidden_states(idx), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(positional.hidden_states(idx, attention=attention_method("full")),
                                   positional.hidden_states(idx), atol=0, rtol=0)
        # a method over several score sets on the NoPE layer: still finite, and the windowed layer as before
        assert torch.isfinite(positional.hidden_states(idx, attention=attention_method("self_extend"))).all()


def test_a_method_that_would_apply_to_no_layer_is_refused():
    with pytest.raises(ValueError, match=r"^attention: self_extend would apply to no layer: every one keeps its "
                                         r"trained window \(model.window=3, model.window_layers=all\)"):
        tiny(window_layers="all").hidden_states(tokens(1, 12), attention=attention_method("self_extend"))


# ----------------------------------------------------------------------------------------------
# SWAN's log scaling of the NoPE layers' logits


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_swan_scaling_is_its_formula_on_the_nope_layers_alone(alpha):
    """s(n) = max(1, 1 + α·ln(n/L)) on the queries of the position-free layer (n = i + 1 keys), α = 1/ln L by
    default, i.e. max(1, log_L n); the RoPE layer unscaled; within L the model is the unscaled one."""
    seq = 30
    model, plain = tiny(nope_logit_scale="swan", nope_logit_alpha=alpha), tiny()
    n = torch.arange(1, seq + 1, dtype=torch.float64)
    factor = 1 / math.log(L) if alpha is None else alpha
    scales = torch.clamp(1 + factor * torch.log(n / L), min=1.0).float()
    if alpha is None:
        torch.testing.assert_close(scales, torch.clamp(torch.log(n) / math.log(L), min=1.0).float())
    idx = tokens(2, seq)
    with torch.no_grad():
        swan = model.hidden_states(idx)
        torch.testing.assert_close(swan, explicit_forward(model, idx, scales), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(swan[:, :L], plain.hidden_states(idx)[:, :L], atol=0, rtol=0)
        assert (swan[:, L:] - plain.hidden_states(idx)[:, L:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Knobs and the run config


@pytest.mark.parametrize("overrides, message", [
    (dict(window=0), r"^model\.window: must lie in \[1, 8\)"),
    (dict(window=L), r"^model\.window: must lie in \[1, 8\) \(below model.context_length"),
    (dict(window_layers="nope"), r"^model\.window_layers: got 'nope', expected one of \['all', 'positional'\]"),
    (dict(nope_every=1), r"^model\.window: no layer to window: model.window_layers=positional .*model.nope_every=1 leaves none"),
    (dict(nope_logit_scale="yarn"), r"^model\.nope_logit_scale: got 'yarn', expected one of \['none', 'swan'\]"),
    (dict(nope_logit_scale="swan", nope_every=None), r"^model\.nope_logit_scale: scales the position-free layers"),
    (dict(nope_logit_scale="swan", attn_temperature="logn"), r"^model\.nope_logit_scale: model.attn_temperature="),
    (dict(nope_logit_alpha=0.5), r"^model\.nope_logit_alpha: only model.nope_logit_scale=swan reads it"),
    (dict(nope_logit_scale="swan", nope_logit_alpha=-1.0), r"^model\.nope_logit_alpha: must be a finite positive"),
])
def test_bad_knobs_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_logn_on_top_of_swan_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^logn: the model already scales its queries .*nope_logit_scale='swan'"):
        tiny(nope_logit_scale="swan").hidden_states(tokens(1, 12), logn=True)


@pytest.mark.parametrize("overrides", [["model.window=64", "model.nope_every=4"], ["experiment=rnope_swa"]])
def test_the_run_config_composes_a_windowed_model(overrides):
    from hydra import compose, initialize_config_dir

    from minillm.cli import register_configs
    from minillm.registry import to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        run = to_run_config(compose("config", overrides=overrides))
    assert run.model.nope_every == 4 and run.model.window in (64, 16) and run.model.window_layers == "positional"
    cfg = ModelConfig.from_dict({**run.model.to_dict(), "vocab_size": 64})
    assert [cfg.windowed(layer) for layer in range(cfg.n_layers)] == [True, True, True, False]
    model = Transformer(cfg).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 64, (1, 20)))).all()
