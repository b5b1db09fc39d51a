"""The transformer: causality, KV-cache decoding, generation, plumbing, init, losses, FLOPs, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.model.config import ModelConfig
from minillm.model.masks import AttentionPlan
from minillm.model.transformer import KVCache, QueryTemperature, RMSNorm, Transformer
from minillm.positions.base import POSITION_ENCODINGS, Positions, position_config
from minillm.positions.rotary import RotaryConfig
from minillm.positions.scaling import (DynamicNTKScaling, LinearScaling, Llama3Scaling, NTKScaling, Scaling, YarnScaling)

VOCAB = 61

# Every registered encoding at its defaults, by its registry name (a new one joins every sweep below), and
# deliberate variants on top: partial rotary, XPos with a decay visible in 16 tokens, KERPLE's power kernel, p = 1/2.
ENCODINGS = {name: position_config(name) for name in POSITION_ENCODINGS}
ENCODINGS.update({
    "partial_rotary": RotaryConfig("rotate_half", rotary_dim=4),
    "complex_xpos": RotaryConfig("complex", xpos_scale_base=16.0),
    "kerple_power": position_config({"variant": "kerple", "kind": "power"}),
    "p_rope_half": position_config({"variant": "p_rope", "p": 0.5}),
})
SCALINGS = {
    "linear": LinearScaling(factor=2.0),
    "ntk": NTKScaling(factor=2.0),
    "yarn": YarnScaling(factor=4.0),
    "llama3": Llama3Scaling(factor=4.0),
    "dynamic_ntk": DynamicNTKScaling(factor=2.0),
}


def tiny(rope=None, rope_scaling=None, seed: int = 0, **overrides) -> Transformer:
    """A small float32 model in eval mode, deterministic in `seed`."""
    kwargs = dict(vocab_size=VOCAB, context_length=16, d_model=32, n_layers=2, n_heads=4, init_std=0.1)
    kwargs.update(overrides)
    cfg = ModelConfig(rope=rope if rope is not None else RotaryConfig(),
                      rope_scaling=rope_scaling if rope_scaling is not None else Scaling(), **kwargs)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Models for the cache/causality sweeps: each encoding, plus GQA, QK-norm and the scalings.
MODEL_CASES = {name: dict(rope=rope) for name, rope in ENCODINGS.items()}
MODEL_CASES.update({f"complex_{name}": dict(rope=RotaryConfig("complex"), rope_scaling=s) for name, s in SCALINGS.items()})
MODEL_CASES.update({
    "complex_gqa_qknorm": dict(rope=RotaryConfig("complex"), n_kv_heads=2, qk_norm=True),
    "xpos_gqa": dict(rope=RotaryConfig("rotate_half", xpos_scale_base=16.0), n_kv_heads=1),
    "alibi_gqa_qknorm": dict(rope=position_config("alibi"), n_kv_heads=2, qk_norm=True),
    "learned_gelu_layernorm_bias": dict(rope=position_config("learned"), ffn="gelu", norm="layernorm", bias=True),
    "complex_nope_every_2": dict(rope=RotaryConfig("complex"), nope_every=2),
    "complex_logn": dict(rope=RotaryConfig("complex"), attn_temperature="logn", context_length=6),
    "alibi_ssmax": dict(rope=position_config("alibi"), attn_temperature="ssmax", context_length=6),
    "alibi_nope_every_2": dict(rope=position_config("alibi"), nope_every=2),
    "cope_gqa_qknorm": dict(rope=position_config("cope"), n_kv_heads=2, qk_norm=True),
    "fire_gqa_qknorm": dict(rope=position_config("fire"), n_kv_heads=2, qk_norm=True),
    "fire_nope_every_2": dict(rope=position_config("fire"), nope_every=2),
    "cope_logn": dict(rope=position_config("cope"), attn_temperature="logn", context_length=6),
})


# ----------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_future_tokens_do_not_change_earlier_logits(case):
    model = tiny(**MODEL_CASES[case])
    idx = tokens(2, 16)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1 + torch.arange(7)) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-6, rtol=0)
    assert (after[:, 9:] - before[:, 9:]).abs().max() > 1e-3  # the change is seen where it is allowed to be


# ----------------------------------------------------------------------------------------------
# KV cache


def decode(model: Transformer, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of idx fed through a KV cache in consecutive chunks of the given sizes."""
    assert sum(chunks) == idx.shape[1]
    cache, logits, start = KVCache(model.cfg.n_layers), [], 0
    for size in chunks:
        logits.append(model(idx[:, start:start + size], cache))
        start += size
        assert cache.length == start
    return torch.cat(logits, dim=1)


# Prefill then single tokens; prefill then a multi-token chunk (bottom-right causal mask) then singles.
CHUNKINGS = {"prefill5_then_singles": [5] + [1] * 11, "prefill4_chunk5_singles": [4, 5, 1, 1, 3, 2]}


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("case", sorted(set(MODEL_CASES) - {"complex_dynamic_ntk"}))
def test_kv_cache_decoding_equals_full_forward(case, chunking):
    model = tiny(**MODEL_CASES[case])
    idx = tokens(2, 16)
    with torch.no_grad():
        full = model(idx)
        cached = decode(model, idx, CHUNKINGS[chunking])
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)


def test_cached_chunk_needs_the_bottom_right_mask():
    """A chunk continuing a cache sees every cached key: a top-left causal mask would hide some of them."""
    model = tiny()
    idx = tokens(1, 9)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg.n_layers)
        model(idx[:, :4], cache)
        mask = model._mask(Positions.contiguous(4, 5, idx.device), torch.float32)
        assert mask.dtype == torch.bool and mask.shape == (5, 9)
        assert mask.sum(-1).tolist() == [5, 6, 7, 8, 9]  # query i sees keys 0 .. 4 + i
        torch.testing.assert_close(model(idx[:, 4:], cache), full[:, 4:], atol=2e-5, rtol=1e-5)
    assert model._mask(Positions.contiguous(0, 9, idx.device), torch.float32) is None  # SDPA's own causal flag
    assert model._mask(Positions.contiguous(8, 1, idx.device), torch.float32) is None  # one query sees every key


def windows(length: int, window: int) -> torch.Tensor:
    """A sliding causal window, and in the first half of the rows one non-causal key (to check that a
    block's keys reach the last one any of its rows may see, not just its own last position)."""
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (k <= q) & (q - k < window)
    allowed[: length // 2, length - 1] = True
    return allowed


@pytest.mark.parametrize("case", ["alibi_gqa_qknorm", "complex_gqa_qknorm", "fire_gqa_qknorm", "cope_gqa_qknorm"])
@pytest.mark.parametrize("pattern", ["causal", "windows"])
def test_blocked_masks_equal_whole_masks(case, pattern, monkeypatch):
    """Over MASK_BUDGET, masks are built per block of queries; losses and gradients stay those of the whole mask."""
    import minillm.model.masks
    import minillm.model.transformer

    model = tiny(**MODEL_CASES[case]).train()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    allowed = windows(16, 5) if pattern == "windows" else None
    whole_loss = model.token_losses(idx, targets, attention_mask=allowed).mean()
    whole_grads = torch.autograd.grad(whole_loss, list(model.parameters()), allow_unused=True)
    positional = not case.startswith("complex")  # a bias per head, or CoPE's explicit attention over every head
    per_row = 16 * (4 if positional else 1)
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 3 * per_row)  # blocks of 3 queries: 6 blocks, the last of 1
    mask = model._mask(Positions.contiguous(0, 16, idx.device), torch.float32, allowed)
    if allowed is None and not positional:
        assert mask is None  # plain causal attention needs no mask, however long
        return
    assert isinstance(mask, minillm.model.masks.BlockedMask)
    blocks = list(mask.blocks())
    assert [len(rows) for rows, _, _ in blocks] == [3, 3, 3, 3, 3, 1]
    blocked_loss = model.token_losses(idx, targets, attention_mask=allowed).mean()
    torch.testing.assert_close(blocked_loss, whole_loss)
    blocked_grads = torch.autograd.grad(blocked_loss, list(model.parameters()), allow_unused=True)
    for blocked, whole in zip(blocked_grads, whole_grads):
        if whole is not None:
            torch.testing.assert_close(blocked, whole)
    if allowed is not None:  # the first blocks reach the non-causal key; the later ones stop at their own rows.
        # Each block starts at the first key its window reaches, except CoPE's, which counts from key 0.
        starts = [0] * 6 if model.position.for_layer(0).contextual else [0, 0, 2, 5, 8, 11]
        assert [keys for _, keys, _ in blocks] == [range(a, b) for a, b in zip(starts, [16, 16, 16, 12, 15, 16])]


@pytest.mark.parametrize("case", ["alibi_gqa_qknorm", "complex_gqa_qknorm", "cope_gqa_qknorm"])
def test_blocked_masks_with_a_pattern_continue_a_cache_and_survive_blind_rows(case, monkeypatch):
    """A pattern over a cache continuation, rows (and a whole block) that see no key, a budget under one row."""
    import minillm.model.masks
    import minillm.model.transformer

    model = tiny(**MODEL_CASES[case])
    idx = tokens(2, 16)
    allowed = windows(16, 5)[6:]  # the last 10 queries after a cache of 6
    allowed[:3] = False  # the first blocks see nothing at all

    def continued():
        cache = KVCache(model.cfg.n_layers)
        model(idx[:, :6], cache)
        return model.hidden_states(idx[:, 6:], cache, attention_mask=allowed)

    with torch.no_grad():
        expected = continued()
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 3)  # under one row: blocks of one query
        mask = model._mask(Positions.contiguous(6, 10, idx.device), torch.float32, allowed)
        assert isinstance(mask, minillm.model.masks.BlockedMask) and len(mask.spans) == 10
        fourth = range(10) if model.position.for_layer(0).contextual else range(5, 10)  # its window: keys 5..9
        assert [keys for _, keys, _ in mask.spans[:4]] == [range(1), range(1), range(1), fourth]  # blind rows keep one key
        torch.testing.assert_close(continued(), expected, equal_nan=True)


def test_cope_attention_is_the_reference_formula():
    """One layer against facebookresearch/RAM's ContextPosSelfAttn, written out: gates σ(q·kᵀ/√d) on the causal mask,
    positions their reverse cumulative sum, logits (q·kᵀ + q·e[p]) / √d + log(mask), softmax, times v."""
    model = tiny(rope=position_config("cope"), n_layers=1)
    attention, cope = model.blocks[0].attn, model.position.for_layer(0)
    with torch.no_grad():
        cope.embedding.normal_(generator=torch.Generator().manual_seed(3))
        x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))
        mask = model._mask(Positions.contiguous(0, 12, x.device), torch.float32, None, cope)
        ours = attention(x, AttentionPlan(mask=mask, contextual=cope))
        q, k, v = (t.view(2, 12, 4, 8).transpose(1, 2) for t in attention.qkv(x).split(32, dim=-1))
        causal = torch.ones(12, 12).tril()
        gates = torch.sigmoid(q @ k.transpose(-1, -2) / math.sqrt(8)) * causal
        positions = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=cope.npos - 1)
        fixed = q @ cope.embedding
        floor = positions.floor().long()
        weight = positions - floor
        position_logits = fixed.gather(-1, positions.ceil().long()) * weight + fixed.gather(-1, floor) * (1 - weight)
        logits = (q @ k.transpose(-1, -2) + position_logits) / math.sqrt(8) + causal.log()
        reference = attention.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 12, 32))
    assert cope.npos == 17  # the training length + 1
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", ["fire", "cope", "t5", "kerple"])
def test_learned_relative_encodings_are_defined_past_the_training_length(rope):
    """8x the training length: finite losses, gradients still reaching the encoding's parameters."""
    model = tiny(rope=position_config(rope)).train()
    idx, targets = tokens(2, 128), tokens(2, 128, seed=2)
    loss = model.token_losses(idx, targets).mean()
    assert bool(loss.isfinite())
    loss.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.position.parameters() if p.grad is not None)


def test_fire_and_cope_keep_one_part_per_layer():
    for rope in ("fire", "cope"):
        model = tiny(rope=position_config(rope), n_layers=3)
        parts = [model.position.for_layer(layer) for layer in range(3)]
        assert len({id(part) for part in parts}) == 3
        assert all(any(True for _ in part.parameters()) for part in parts)


@pytest.mark.parametrize("rope", ["fire", "cope"])
def test_position_free_layers_hold_no_encoding_parameters(rope):
    """Every parameter trains (DDP, which does not look for unused ones, would stop otherwise)."""
    model = tiny(rope=position_config(rope), n_layers=4, nope_every=2).train()
    assert sorted(model.position.layers) == ["0", "2"]  # layers 1 and 3 see no positions
    model.token_losses(tokens(2, 16), tokens(2, 16, seed=2)).mean().backward()
    with torch.no_grad():  # CoPE's tables start at zero; any nonzero gradient shows they are used
        unused = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert unused == []


def test_blocked_masks_are_built_once_for_every_layer_under_autograd_and_per_layer_without(monkeypatch):
    """With autograd, SDPA keeps each layer's mask: one shared set of blocks costs at most the whole mask."""
    import minillm.model.masks
    import minillm.model.transformer

    model = tiny(**MODEL_CASES["alibi_gqa_qknorm"])
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 4 * 16 * 4)
    first_masks = lambda mask: [m for _, _, m in mask.blocks()]  # noqa: E731
    trained = model._mask(Positions.contiguous(0, 16, torch.device("cpu")), torch.float32)
    assert all(a is b for a, b in zip(first_masks(trained), first_masks(trained)))
    with torch.no_grad():
        evaluated = model._mask(Positions.contiguous(0, 16, torch.device("cpu")), torch.float32)
        assert evaluated.prebuilt is None
        assert not any(a is b for a, b in zip(first_masks(evaluated), first_masks(evaluated)))


@pytest.mark.parametrize("case", ["alibi_gqa_qknorm", "complex", "xpos_gqa"])
@pytest.mark.parametrize("budget", ["whole", "blocked"])
def test_every_mask_keeps_sdpa_on_its_flash_kernel(case, budget, monkeypatch):
    """Flash (CPU's fused kernel) accepts 2-d and 4-d masks only; anything else would fall back to the math path."""
    import minillm.model.masks
    import minillm.model.transformer
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from minillm.positions.methods import attention_method

    if budget == "blocked":
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 4 * 16 * 4)
    model = tiny(**MODEL_CASES[case]).train()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for method in (None, attention_method("sliding", {"window": 5})):
            model.token_losses(idx, targets, attention=method).mean().backward()
        with torch.no_grad():
            decode(model.eval(), idx, CHUNKINGS["prefill4_chunk5_singles"])  # a chunk continuing a cache


@pytest.mark.parametrize("case", ["alibi_gqa_qknorm", "complex"])
def test_blocked_masks_continue_a_cache(case, monkeypatch):
    import minillm.model.masks
    import minillm.model.transformer

    model = tiny(**MODEL_CASES[case])
    idx = tokens(2, 16)
    with torch.no_grad():
        full = model(idx)
        monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 2 * 16 * 4)
        cache = KVCache(model.cfg.n_layers)
        model(idx[:, :6], cache)
        assert isinstance(model._mask(Positions.contiguous(6, 10, idx.device), torch.float32), minillm.model.masks.BlockedMask)
        torch.testing.assert_close(model(idx[:, 6:], cache), full[:, 6:], atol=2e-5, rtol=1e-5)


def prefix_logits(model: Transformer, idx: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Each chunk's logits from the full forward over everything up to the chunk's end."""
    ends = torch.tensor(chunks).cumsum(0).tolist()
    return torch.cat([model(idx[:, :end])[:, end - size:] for size, end in zip(chunks, ends)], dim=1)


def test_dynamic_ntk_decoding_equals_forward_over_the_prefix():
    """KVCache semantics: with one layer, step t equals the last logit of the full forward over the first
    t + 1 tokens, also past context_length where dynamic NTK changes the frequencies with the length."""
    model = tiny(rope_scaling=DynamicNTKScaling(factor=2.0), context_length=8, n_layers=1)
    idx = tokens(2, 20)
    chunks = [3, 1, 1, 4] + [1] * 11  # the 4-token chunk (positions 5..8) ends at length 9 > 8
    with torch.no_grad():
        cached = decode(model, idx, chunks)
        expected = prefix_logits(model, idx, chunks)
        full = model(idx)
    torch.testing.assert_close(cached, expected, atol=2e-5, rtol=1e-5)
    # The test is meaningful: the forward over all 20 tokens uses the frequencies for length 20 at every
    # position, so it differs from decoding everywhere but position 0 (angle zero, attending only to itself)
    # and the last position (the same forward).
    torch.testing.assert_close(full[:, 0], cached[:, 0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, -1], cached[:, -1], atol=2e-5, rtol=1e-5)
    gap = (full[:, 1:19] - cached[:, 1:19]).abs().amax(dim=(0, 2))
    assert (gap > 1e-3).all(), gap
    # Chunk rows use the frequencies of the chunk's end: positions 5..7 differ from their own prefixes.
    own_prefix = torch.stack([model(idx[:, :t + 1])[:, -1] for t in range(5, 8)], dim=1).detach()
    assert (cached[:, 5:8] - own_prefix).abs().max() > 1e-3


def test_dynamic_ntk_deeper_layers_keep_hidden_states_of_earlier_lengths():
    """The documented limit of the cache: past the trained length, layers after the first attend to keys
    and values computed from hidden states of earlier steps, so decoding leaves the prefix forward."""
    model = tiny(rope_scaling=DynamicNTKScaling(factor=2.0), context_length=8, n_layers=2)
    idx = tokens(2, 14)
    chunks = [1] * 14
    with torch.no_grad():
        cached, expected = decode(model, idx, chunks), prefix_logits(model, idx, chunks)
    torch.testing.assert_close(cached[:, :8], expected[:, :8], atol=2e-5, rtol=1e-5)  # plain frequencies up to 8
    gap = (cached[:, 8:] - expected[:, 8:]).abs().amax(dim=(0, 2))
    assert (gap > 1e-4).all(), gap


# ----------------------------------------------------------------------------------------------
# generate


def greedy_by_full_forwards(model: Transformer, idx: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.cat((idx, model(idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("case", ["complex", "complex_xpos", "alibi_gqa_qknorm", "learned", "complex_yarn"])
def test_greedy_generate_equals_argmax_of_full_forwards(case):
    model = tiny(**MODEL_CASES[case], init_std=0.5)  # wide logits: greedy does not just repeat a token
    prompt = tokens(3, 4)
    # 4 + 13 = 17 = context_length + 1 tokens: the last token is sampled from position 15's logits
    # (learned positions stop at 15, so no forward pass may run after the last token).
    out = model.generate(prompt, max_new_tokens=13, temperature=0)
    assert out.shape == (3, 17) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, greedy_by_full_forwards(model, prompt, 13))
    assert all(len(set(row[4:].tolist())) > 4 for row in out)  # a real continuation, not one repeated token


def test_top_k_one_sampling_equals_greedy():
    model = tiny()
    prompt = tokens(4, 3)
    greedy = model.generate(prompt, 10, temperature=0)
    for temperature in (0.5, 1.0, 3.0):
        sampled = model.generate(prompt, 10, temperature=temperature, top_k=1,
                                 generator=torch.Generator().manual_seed(7))
        assert torch.equal(sampled, greedy)


def test_seeded_sampling_is_reproducible():
    model = tiny()
    prompt = tokens(2, 3)

    def sample(seed, top_k=None):
        return model.generate(prompt, 12, temperature=2.0, top_k=top_k, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(3, top_k=5), sample(3, top_k=5))
    # top_k=5: every sampled token is among the 5 most likely under the model at that step
    out = sample(3, top_k=5)
    with torch.no_grad():
        logits = model(out[:, :-1])[:, 2:]
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == out[:, 3:, None]).any(-1).all()


def test_stop_token_stops_rows_and_pads_them():
    model = tiny(init_std=0.5)
    prompt = tokens(2, 3, seed=5)
    free = model.generate(prompt, 12, temperature=0)
    stop = int(free[0, 6])  # row 0 emits it first at its fourth new token
    first = [row[3:].tolist().index(stop) if stop in row[3:].tolist() else None for row in free]
    assert first[0] == 3 and (first[1] is None or first[1] > 3), first  # rows stop at different steps
    assert (free[0, 7:] != stop).any()  # without the stop token, row 0 would go on differently

    out = model.generate(prompt, 12, temperature=0, stop_token=stop)
    width = out.shape[1] - 3
    assert width == (12 if first[1] is None else max(first) + 1)
    for row, f in zip(range(2), first):
        if f is None:
            assert torch.equal(out[row], free[row])  # never stopped: unaffected by the other row stopping
        else:
            assert torch.equal(out[row, :3 + f + 1], free[row, :3 + f + 1])
            assert (out[row, 3 + f:] == stop).all()  # padded with the stop token

    # Every row stops: generation ends early.
    single = model.generate(prompt[:1], 12, temperature=0, stop_token=stop)
    assert torch.equal(single, free[:1, :7])


def test_generate_rejects_invalid_arguments():
    model = tiny()
    prompt = tokens(1, 2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, temperature=-0.1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 3, top_k=0)
    assert model.generate(prompt, 0).shape == (1, 2)


# ----------------------------------------------------------------------------------------------
# Shapes and plumbing


def test_tied_embeddings_share_storage_untied_do_not():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.head.weight is tied.embed.weight
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + VOCAB * 32


def mha_from_gqa(gqa: Transformer) -> Transformer:
    """The multi-head model whose k/v heads are the GQA model's, each repeated n_heads / kv_heads times."""
    cfg = gqa.cfg
    mha = Transformer(ModelConfig.from_dict({**cfg.to_dict(), "n_kv_heads": None})).eval()
    group, hd = cfg.n_heads // cfg.kv_heads, cfg.head_dim
    state = dict(gqa.state_dict())
    for i in range(cfg.n_layers):
        for part in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{part}"
            if key not in state:
                continue
            q, k, v = state[key].split([cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd])
            k, v = (t.unflatten(0, (cfg.kv_heads, hd)).repeat_interleave(group, dim=0).flatten(0, 1) for t in (k, v))
            state[key] = torch.cat((q, k, v))
    mha.load_state_dict(state)
    return mha


@pytest.mark.parametrize("case", ["complex", "complex_xpos", "alibi", "none"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gqa_equals_mha_with_repeated_kv_heads(case, qk_norm):
    gqa = tiny(rope=ENCODINGS[case], n_heads=4, n_kv_heads=2, qk_norm=qk_norm, bias=True)
    with torch.no_grad():  # non-zero biases so that their split is checked too
        for block in gqa.blocks:
            block.attn.qkv.bias.normal_()
    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 8, 32)
    mha = mha_from_gqa(gqa)
    assert mha.blocks[0].attn.qkv.weight.shape == (3 * 32, 32)
    idx = tokens(2, 12)
    with torch.no_grad():
        expected = mha(idx)
        torch.testing.assert_close(gqa(idx), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode(gqa, idx, [4, 5, 1, 2]), expected, atol=2e-5, rtol=1e-5)


def test_qk_norm_makes_attention_invariant_to_query_and_key_scale():
    for qk_norm in (False, True):
        model = tiny(qk_norm=qk_norm, n_layers=1, norm_eps=1e-12)  # eps would break exact scale invariance
        assert type(model.blocks[0].attn.q_norm).__name__ == ("RMSNorm" if qk_norm else "Identity")
        idx = tokens(2, 8)
        with torch.no_grad():
            before = model(idx)
            model.blocks[0].attn.qkv.weight[:64] *= 10.0  # queries and keys, not values
            after = model(idx)
        if qk_norm:
            torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
        else:
            assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
def test_feed_forward_computes_its_formula(ffn):
    model = tiny(ffn=ffn, d_model=64, bias=True)
    hidden = model.cfg.hidden_dim
    assert hidden == (192 if ffn == "swiglu" else 256)
    layer = model.blocks[0].ffn
    assert layer.up.weight.shape == ((2 if ffn == "swiglu" else 1) * hidden, 64)
    assert layer.down.weight.shape == (64, hidden)
    with torch.no_grad():
        layer.up.bias.normal_()
        x = torch.randn(3, 64)
        up = x @ layer.up.weight.T + layer.up.bias
        if ffn == "swiglu":
            act = F.silu(up[:, :hidden]) * up[:, hidden:]
        else:
            act = 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up**3)))
        torch.testing.assert_close(layer(x), act @ layer.down.weight.T + layer.down.bias, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_and_bias_choices(norm, bias):
    model = tiny(norm=norm, bias=bias)
    block = model.blocks[0]
    assert isinstance(block.attn_norm, RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm)
    for linear in (block.attn.qkv, block.attn.proj, block.ffn.up, block.ffn.down):
        assert (linear.bias is not None) == bias
        if bias:
            assert (linear.bias == 0).all()
    assert model.head.bias is None
    if norm == "layernorm":
        assert (block.attn_norm.bias is not None) == bias
    x = torch.randn(2, 5, 32) * 3 + 1
    expected = (F.layer_norm(x, (32,), eps=1e-5) if norm == "layernorm"
                else x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())
    torch.testing.assert_close(block.attn_norm(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model(tokens(2, 6))).all()


def test_dropout_only_in_train_mode():
    model = tiny(attn_dropout=0.3, resid_dropout=0.3)
    plain = tiny(attn_dropout=0.0, resid_dropout=0.0)  # same seed, same weights
    idx = tokens(2, 10)
    with torch.no_grad():
        evaluated = model(idx)
        torch.testing.assert_close(evaluated, plain(idx))
        torch.testing.assert_close(model(idx), evaluated)
        model.train()
        first, second = model(idx), model(idx)
    assert (first - second).abs().max() > 1e-3
    assert (first - evaluated).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# Norms and dtypes


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_computes_in_float32_and_casts_back(weight_dtype):
    norm = RMSNorm(48, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.3, 2.7, 48))
    x = (torch.randn(4, 7, 48) * 5).to(torch.bfloat16)
    x32, w32 = x.float(), norm.weight.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * w32).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert norm(x32).dtype == torch.float32


def test_rmsnorm_backward_passes_gradcheck():
    """RMSNorm has its own backward; finite differences in float64 check it for x and the gain."""
    norm = RMSNorm(6, eps=1e-3).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    gain = torch.linspace(0.5, 2.0, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: torch.func.functional_call(norm, {"weight": g}, (x,)), (x, gain))


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("weight_dtype", DTYPES)
def test_rmsnorm_gradients_for_every_pair_of_input_and_gain_dtypes(x_dtype, weight_dtype):
    norm = RMSNorm(16).to(weight_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(3, 4, 16).to(x_dtype).requires_grad_()
    grad = torch.randn(3, 4, 16).to(x_dtype)
    norm(x).backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64).backward(grad.double())
    assert x.grad.dtype == x_dtype and norm.weight.grad.dtype == weight_dtype
    low = {torch.bfloat16, torch.float16} & {x_dtype, weight_dtype}
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, **tol)


def test_rmsnorm_backward_grads_only_what_requires_them():
    """A frozen gain (or an input that needs no gradient) gets none, and the other gradient is unchanged."""
    x = torch.randn(4, 3, 16)
    grad = torch.randn(4, 3, 16)
    both = RMSNorm(16)
    x_both = x.clone().requires_grad_()
    both(x_both).backward(grad)
    frozen = RMSNorm(16).requires_grad_(False)
    x_only = x.clone().requires_grad_()
    frozen(x_only).backward(grad)
    torch.testing.assert_close(x_only.grad, x_both.grad)
    gain_only = RMSNorm(16)
    gain_only(x).backward(grad)
    torch.testing.assert_close(gain_only.weight.grad, both.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gradients_equal_autograd_of_the_formula_on_strided_views(dtype):
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.3, 2.7, 8))
    base = torch.randn(3, 5, 24)
    x = base[..., 8:16].to(dtype).requires_grad_()  # a slice of a fused projection, as QK-norm sees it
    grad = torch.randn(3, 5, 8).to(dtype)
    x_ref = x.detach().clone().requires_grad_()
    weight_ref = norm.weight.detach().clone().requires_grad_()
    x32 = x_ref.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * weight_ref).to(dtype)
    out = norm(x)
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, expected, **tol)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, weight_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["complex_xpos", "alibi_gqa_qknorm", "sinusoidal", "learned_gelu_layernorm_bias",
                                  "complex_yarn"])
def test_bf16_forward_is_finite_and_close_to_float32(case):
    model = tiny(**MODEL_CASES[case])
    idx = tokens(2, 16)
    with torch.no_grad():
        reference = model(idx)
        model.to(torch.bfloat16)
        logits = model(idx)
        cached = decode(model, idx, [6, 1, 9])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and torch.isfinite(cached).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("case", ["complex", "rotate_half", "partial_rotary", "alibi"])
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_attention_hands_sdpa_dense_heads(case, precision, monkeypatch):
    """q, k and v reach SDPA with each head's (seq, head_dim) block dense, the layout its CPU kernels run fastest
    on, in training and in evaluation, rotated or not."""
    sdpa, layouts = F.scaled_dot_product_attention, []

    def spy(q, k, v, *args, **kwargs):
        layouts.append(tuple(t.is_contiguous() for t in (q, k, v)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny(rope=ENCODINGS[case])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model.loss(tokens(2, 16), tokens(2, 16, seed=2)).backward()
        with torch.no_grad():
            model.token_losses(tokens(1, 16), tokens(1, 16, seed=2))
    assert layouts == [(True, True, True)] * 2 * model.cfg.n_layers


def test_autocast_bf16_keeps_norm_outputs_in_bf16():
    model = tiny(rope=position_config("alibi"), qk_norm=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens(2, 8))
        assert model.blocks[0].attn.q_norm(torch.randn(3, 8).bfloat16()).dtype == torch.bfloat16
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------
# Initialisation


def test_init_scales_residual_projections_by_depth():
    cfg = ModelConfig(vocab_size=512, context_length=64, d_model=256, n_layers=8, n_heads=4, init_std=0.05,
                      bias=True, tie_embeddings=False, rope=position_config("learned"))
    torch.manual_seed(0)
    model = Transformer(cfg)
    residual_std = 0.05 / math.sqrt(2 * 8)

    def close(t, std):
        return abs(t.std().item() / std - 1) < 0.03 and abs(t.mean().item()) < 3 * std / math.sqrt(t.numel())

    for block in model.blocks:
        assert close(block.attn.proj.weight, residual_std) and close(block.ffn.down.weight, residual_std)
        assert close(block.attn.qkv.weight, 0.05) and close(block.ffn.up.weight, 0.05)
        for linear in (block.attn.qkv, block.attn.proj, block.ffn.up, block.ffn.down):
            assert (linear.bias == 0).all()
        assert (block.attn_norm.weight == 1).all() and (block.ffn_norm.weight == 1).all()
    for weight in (model.embed.weight, model.head.weight, model.position.table.weight):
        assert close(weight, 0.05)


# ----------------------------------------------------------------------------------------------
# Losses and training


@pytest.mark.parametrize("chunk_tokens", [1, 7, 8192])
def test_token_losses_equal_cross_entropy_on_full_logits(chunk_tokens):
    model = tiny(tie_embeddings=False)
    idx, targets = tokens(3, 11, seed=2), tokens(3, 11, seed=3)
    with torch.no_grad():
        logits = model(idx)
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 11)
        losses = model.token_losses(idx, targets, chunk_tokens=chunk_tokens)
        assert losses.shape == (3, 11) and losses.dtype == torch.float32
        torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.loss(idx, targets), expected.mean(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_loss_gradients_equal_cross_entropy_on_full_logits(tie_embeddings):
    """Transformer.loss fuses the LM head with the loss; every parameter's gradient is unchanged by it."""
    model = tiny(tie_embeddings=tie_embeddings)
    idx, targets = tokens(3, 11, seed=2), tokens(3, 11, seed=3)
    fused = model.loss(idx, targets)
    fused_grads = torch.autograd.grad(fused * 2.5, list(model.parameters()))
    plain = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    plain_grads = torch.autograd.grad(plain * 2.5, list(model.parameters()))
    torch.testing.assert_close(fused, plain)
    for (name, _), ours, theirs in zip(model.named_parameters(), fused_grads, plain_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)


def test_answer_only_loss_ignores_the_prompt_tokens():
    """A synthetic task's targets are IGNORE (-100) off its answers: the loss is the answers' mean, its gradients
    those of F.cross_entropy's ignore_index, and a prompt position's target, whatever it says, changes nothing."""
    from minillm.data.synthetic import IGNORE

    model = tiny(tie_embeddings=False)
    idx, targets = tokens(3, 11, seed=2), tokens(3, 11, seed=3)
    answers = torch.zeros(3, 11, dtype=torch.bool)
    answers[:, 7:] = True
    answers[1, 2] = True
    masked = torch.where(answers, targets, IGNORE)
    loss = model.loss(idx, masked)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(idx)
    expected = F.cross_entropy(logits[answers], targets[answers])  # the answers' mean, nothing else
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected)
    for (name, _), ours, theirs in zip(model.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6, msg=name)
    # The gradient reaching the logits of a prompt position is zero: no prompt target is learned.
    hidden = model.hidden_states(idx).detach().requires_grad_()
    from minillm.kernels import linear_cross_entropy

    (grad_hidden,) = torch.autograd.grad(linear_cross_entropy(hidden.flatten(0, 1), model.head.weight, masked.flatten()),
                                         hidden)
    assert grad_hidden[~answers].abs().max() == 0 and grad_hidden[answers].abs().min() > 0


def test_compiled_blocks_carry_the_training_loss():
    """compile_blocks puts every block's forward through torch.compile, on the path loss() takes."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward  # run the captured graph as it is

    model = tiny().train()
    idx, targets = tokens(2, 9, seed=2), tokens(2, 9, seed=3)
    expected = model.loss(idx, targets)
    model.compile_blocks(backend=recording_backend)
    torch._dynamo.reset()
    compiled = model.loss(idx, targets)
    assert graphs, "no block went through torch.compile"
    torch.testing.assert_close(compiled, expected)
    torch._dynamo.reset()


def test_a_few_adam_steps_fit_a_repeated_sequence():
    model = tiny(seed=0, init_std=0.02).train()
    sequence = tokens(1, 17, seed=4).repeat(4, 1)
    idx, targets = sequence[:, :-1], sequence[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    initial = model.loss(idx, targets).item()
    assert abs(initial - math.log(VOCAB)) < 0.15  # near-uniform predictions at init
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss(idx, targets)
        loss.backward()
        optimizer.step()
    final = model.loss(idx, targets).item()
    assert final < 0.1, (initial, final)


# ----------------------------------------------------------------------------------------------
# FLOPs and limits


def test_flops_per_token_hand_computed():
    cfg = dict(vocab_size=64, context_length=32, d_model=16, n_layers=2, n_heads=2)
    # Per layer: 2 norms of 16, qkv 16·48, proj 16·16, swiglu up 16·(2·64), down 64·16 (hidden = 64).
    per_layer = 2 * 16 + 16 * 48 + 16 * 16 + 16 * 128 + 64 * 16
    n = 2 * per_layer + 16 + 64 * 16  # + final norm + the LM head (the tied embedding counts once)
    assert n == 9296
    expected = 6 * 9296 + 12 * 2 * 16 * 32
    for tie, rope in ((True, RotaryConfig()), (False, RotaryConfig()), (True, position_config("learned"))):
        model = Transformer(ModelConfig(tie_embeddings=tie, rope=rope, **cfg))
        assert model.num_params() == n
        assert model.flops_per_token(32) == expected == 68064
    assert model.num_params(exclude_embeddings=False) == n + 32 * 16  # the learned position table


def test_learned_positions_past_the_table_raise():
    model = tiny(rope=position_config("learned"), context_length=8)
    with torch.no_grad():
        assert model(tokens(1, 8)).shape == (1, 8, VOCAB)
        with pytest.raises(ValueError, match=r"0\.\.7"):
            model(tokens(1, 9))
        cache = KVCache(model.cfg.n_layers)
        model(tokens(1, 8), cache)
        with pytest.raises(ValueError, match="asked for position 8"):
            model(tokens(1, 1), cache)


@pytest.mark.parametrize("rope", ["complex", "alibi", "t5"])
def test_nope_every_one_is_nope_with_the_same_weights(rope):
    """model.nope_every=1 makes every layer position-free: the model is NoPE, whatever its encoding."""
    free = tiny(rope=position_config(rope), nope_every=1)
    nope = tiny(rope=position_config("none"))
    nope.load_state_dict({k: v for k, v in free.state_dict().items() if not k.startswith("position.")})
    idx = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(free(idx), nope(idx), rtol=0, atol=0)


def test_nope_every_leaves_the_other_layers_their_positions():
    """nope_every=2 over 2 layers: layer 0 rotates, layer 1 does not. The same weights with nope_every=None differ,
    and so do those with every layer free."""
    cases = {every: tiny(rope=RotaryConfig("complex"), nope_every=every, seed=3) for every in (None, 1, 2)}
    for model in cases.values():
        model.load_state_dict(cases[None].state_dict())
    assert [cases[2].cfg.position_free(layer) for layer in range(2)] == [False, True]
    idx = tokens(1, 16)
    with torch.no_grad():
        logits = {every: model(idx) for every, model in cases.items()}
    assert not torch.allclose(logits[2], logits[None]) and not torch.allclose(logits[2], logits[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(nope_every=0), r"^model\.nope_every: must be at least 1"),
    (dict(nope_every=2, rope=position_config("sinusoidal")), r"^model\.nope_every: position-free layers need"),
    (dict(nope_every=2, rope=position_config("learned")), r"^model\.nope_every: position-free layers need"),
])
def test_nope_every_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_query_temperatures_by_hand():
    positions = torch.tensor([[0, 15, 16, 31, 255]])
    logn = QueryTemperature("logn", 4, trained_length=16)(positions)
    assert logn.shape == (1, 1, 5, 1)  # one factor for every head
    expected = [1.0, 1.0, math.log(17) / math.log(16), 1.25, 2.0]  # max(1, log_16(m + 1))
    torch.testing.assert_close(logn[0, 0, :, 0], torch.tensor(expected))
    ssmax = QueryTemperature("ssmax", 4, trained_length=16)
    factors = ssmax(positions)
    assert factors.shape == (1, 4, 5, 1)
    torch.testing.assert_close(factors[0, :, 1, 0], torch.ones(4))  # s = 1/log L: 1 for a query that sees L keys
    torch.testing.assert_close(factors[0, 2, :, 0], torch.log1p(positions[0].float()) / math.log(16))
    factors.sum().backward()
    assert ssmax.s.grad is not None and bool((ssmax.s.grad != 0).all())


def test_logn_changes_nothing_within_the_training_length():
    plain = tiny(context_length=16)
    logn = tiny(context_length=16, attn_temperature="logn")
    logn.load_state_dict(plain.state_dict())
    idx = tokens(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(logn(idx)[:, :16], plain(idx)[:, :16], rtol=0, atol=0)
        assert not torch.allclose(logn(idx)[:, 17:], plain(idx)[:, 17:])  # past it, sharper attention


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn_temperature="cubic"), r"^model\.attn_temperature: got 'cubic'"),
    (dict(attn_temperature="logn", context_length=1), r"^model\.attn_temperature: scales by log_L"),
])
def test_attention_temperature_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
