"""Attention methods: each against its definition written out entry by entry, their merge against one explicit
softmax, KV-cache decoding, linear memory, and the named refusals (what every registered method must satisfy, its
parts disjoint and causal, is in test_registries.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minillm.model.masks
import minillm.model.transformer
from minillm.positions.methods import ATTENTION_METHODS, Window, attention_method, check_encoding
from minillm.model.config import ModelConfig
from minillm.kernels import attention_with_lse
from minillm.model.transformer import KVCache, Transformer
from minillm.model.masks import ScoreSet, merged_attention
from minillm.positions.base import Positions, position_config
from minillm.positions.rotary import RotaryConfig, rotate_interleaved

CPU = torch.device("cpu")
TRAINED = 8


def seen_distance(method, length: int, trained: int = TRAINED) -> dict[tuple[int, int], float]:
    """{(i, j): query position − key position of the one part that admits (i, j)}, from the method's parts."""
    positions = Positions.contiguous(0, length, CPU)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    table: dict[tuple[int, int], float] = {}
    for part in method.parts(positions, trained):
        admitted = (j <= i) if part.pattern is None else part.pattern(i, j)
        distance = part.positions.query[0][:, None] - part.positions.key[0][None, :]
        for a, b in admitted.nonzero().tolist():
            assert (a, b) not in table, f"parts overlap at {(a, b)}"
            table[a, b] = float(distance[a, b])
    return table


def by_hand(rule, length: int) -> dict[tuple[int, int], float]:
    """{(i, j): distance} over every causal pair the rule admits (rule returns None for unseen pairs)."""
    return {(i, j): d for i in range(length) for j in range(i + 1) if (d := rule(i, j)) is not None}


def test_sliding_and_blockwise_by_hand():
    sliding = seen_distance(attention_method("sliding", {"window": 3}), 8)
    assert sliding == by_hand(lambda i, j: i - j if i - j < 3 else None, 8)
    blockwise = seen_distance(attention_method("blockwise"), 10, trained=4)  # blocks of 2: {0,1} {2,3} ...
    assert sorted(j for (i, j) in blockwise if i == 4) == [2, 3, 4]
    assert sorted(j for (i, j) in blockwise if i == 9) == [6, 7, 8, 9]
    assert all(d == i - j and i - j < 4 for (i, j), d in blockwise.items())


@pytest.mark.parametrize("group, window", [(2, 4), (3, 5), (8, 4), (1, 3)])
def test_self_extend_positions_are_the_papers(group, window):
    """Neighbours at their own distance below W; beyond, ⌊i/G⌋ + W − ⌊W/G⌋ − ⌊j/G⌋ (datamllab/LongLM)."""
    method = attention_method("self_extend", {"group": group, "window": window})
    expected = by_hand(lambda i, j: i - j if i - j < window else i // group + window - window // group - j // group, 40)
    assert seen_distance(method, 40, trained=16) == expected


def test_self_extend_defaults_follow_the_training_length():
    method = attention_method("self_extend")
    assert (method.group, method.window) == (8, None)
    assert seen_distance(method, 64, trained=16) == seen_distance(attention_method("self_extend", {"window": 8}), 64, 16)


def test_rerope_and_leaky_rerope_cap_the_distance():
    rerope = seen_distance(attention_method("rerope", {"window": 3}), 12)
    assert rerope == by_hand(lambda i, j: min(i - j, 3), 12)
    leaky = seen_distance(attention_method("leaky_rerope", {"window": 3, "k": 4.0}), 12)
    expected = by_hand(lambda i, j: i - j if i - j < 3 else 3 + (i - j - 3) / 4, 12)
    assert leaky.keys() == expected.keys()
    assert all(leaky[key] == pytest.approx(value, abs=1e-12) for key, value in expected.items())
    assert seen_distance(attention_method("rerope"), 30) == by_hand(lambda i, j: min(i - j, TRAINED // 2), 30)


def test_lm_infinite_is_lambda_shaped_with_capped_distances():
    method = attention_method("lm_infinite", {"n_global": 2, "n_local": 4, "limit": 6})
    expected = by_hand(lambda i, j: i - j if i - j < 4 else (6 if j < 2 else None), 20)
    assert seen_distance(method, 20) == expected
    defaults = seen_distance(attention_method("lm_infinite"), 40)
    assert defaults == by_hand(lambda i, j: i - j if i - j < TRAINED else (TRAINED if j < 10 else None), 40)


def test_sinks_keep_the_first_tokens_and_shift_positions_inside_the_cache():
    """A cache of start + recent tokens: the query sits at min(i, start + recent − 1), a sink at its index."""
    method = attention_method("sinks", {"start": 2, "recent": 3})
    expected = by_hand(lambda i, j: i - j if i - j < 3 else (min(i, 4) - j if j < 2 else None), 16)
    assert seen_distance(method, 16) == expected
    defaults = seen_distance(attention_method("sinks"), 30)  # start 4, recent L − 4: the cache holds L tokens
    assert defaults == by_hand(lambda i, j: i - j if i - j < TRAINED - 4 else (min(i, TRAINED - 1) - j if j < 4 else None), 30)


@pytest.mark.parametrize("window", [Window(0), Window(0, 4), Window(3), Window(5, key_stop=4), Window(2, 6, key_stop=9),
                                    Window(0, 0), Window(40)])
def test_a_windows_key_ranges_are_those_its_pattern_admits(window):
    """Window.keys against the pattern evaluated pair by pair: the keys some query of the block sees, and those
    every one sees, for every block of queries over 30 keys."""
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    admitted = window(i, j)
    assert torch.equal(admitted, torch.tensor([[window.d_min <= a - b <= (window.d_max if window.d_max is not None
                                                                           else 99) and b < (window.key_stop or 99)
                                                for b in range(30)] for a in range(30)]))
    for first in range(30):
        for last in range(first, 30):
            some, every = window.keys(first, last, 30)
            rows = admitted[first:last + 1]
            assert set(some) == set(rows.any(0).nonzero().flatten().tolist())
            assert set(every) == set(rows.all(0).nonzero().flatten().tolist())


def explicit_merge(q, k, v, rope, parts_by_hand) -> torch.Tensor:
    """One explicit softmax over scores taken, entry by entry, from the part that admits each pair (LongLM's
    torch.where merge), the rotation written with the reference formula."""
    q_len, k_len = q.shape[-2], k.shape[-2]
    scores = torch.full((*q.shape[:2], q_len, k_len), float("-inf"))
    for query_positions, key_positions, admitted in parts_by_hand:
        def turned(x, positions):
            angles = positions.double()[:, None] * rope.inv_freq.double()[None, :]
            return rotate_interleaved(x, angles.cos().float(), angles.sin().float())
        part = turned(q, query_positions) @ turned(k, key_positions).transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = torch.where(admitted, part, scores)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("rows", [None, 4])  # each part's mask whole; by blocks of 4 queries over their pieces
@pytest.mark.parametrize("grad", [False, True])  # the flash kernel's log-sum-exp; the explicit formula
@pytest.mark.parametrize("name", ["self_extend", "rerope", "leaky_rerope", "lm_infinite", "sinks"])
def test_merged_parts_equal_one_explicit_softmax(name, grad, rows, monkeypatch):
    if rows is not None:
        monkeypatch.setattr(minillm.model.transformer, "PATTERN_ROWS", rows)
    rope = RotaryConfig("interleaved").build(ModelConfig(d_model=32, n_heads=2).shape, ModelConfig().rope_scaling)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 30, 16, generator=g) for _ in range(3))
    method = attention_method(name, {"window": 3} if name in ("self_extend", "rerope", "leaky_rerope") else {})
    positions = Positions.contiguous(0, 30, CPU)
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    parts = method.parts(positions, TRAINED)
    model = Transformer(ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=1, rope=RotaryConfig("interleaved")))
    with torch.set_grad_enabled(grad):
        sets = [ScoreSet(rope.rotation(p.positions), model._mask(p.positions, torch.float32, p.pattern)) for p in parts]
        if rows is not None:  # every part by blocks; the far parts' blocks cut into an unmasked run and the rest
            assert all(isinstance(s.mask, minillm.model.masks.BlockedMask) for s in sets)
            assert any(len(pieces) > 1 for s in sets for _, pieces in s.mask.pieces())
        ours = merged_attention(q, k, v, sets, None)
    reference = explicit_merge(q, k, v, rope, [(p.positions.query[0], p.positions.key[0], p.pattern(i, j)) for p in parts])
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [None, 4])
@pytest.mark.parametrize("name", ["self_extend", "lm_infinite", "sinks"])
def test_merged_parts_with_a_bias_and_a_query_temperature_equal_one_explicit_softmax(name, rows, monkeypatch):
    """ALiBi's bias taken at each part's own positions, queries scaled per position (logn at evaluation)."""
    if rows is not None:  # by blocks of 4 queries: a bias leaves no key unmasked, so no block is cut
        monkeypatch.setattr(minillm.model.transformer, "PATTERN_ROWS", rows)
    from minillm.model.transformer import QueryTemperature
    from minillm.positions.bias import alibi_slopes

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 30, 8, generator=g) for _ in range(3))
    method = attention_method(name, {"window": 3} if name == "self_extend" else {})
    model = Transformer(ModelConfig(vocab_size=16, d_model=32, n_heads=4, n_layers=1, rope=position_config("alibi")))
    positions = Positions.contiguous(0, 30, CPU)
    temperature = QueryTemperature("logn", 4, TRAINED)(positions.query)
    parts = method.parts(positions, TRAINED)
    with torch.no_grad():
        ours = merged_attention(q, k, v, [ScoreSet(None, model._mask(p.positions, torch.float32, p.pattern,
                                                                     model.position)) for p in parts], temperature)
    i, j = torch.arange(30)[:, None], torch.arange(30)[None, :]
    slopes = torch.tensor(alibi_slopes(4))[:, None, None]
    scores = torch.full((1, 4, 30, 30), float("-inf"))
    for p in parts:
        distance = (p.positions.query[0][:, None] - p.positions.key[0][None, :]).float()
        part = (q * temperature) @ k.transpose(-1, -2) / math.sqrt(8) - slopes * distance
        scores = torch.where(p.pattern(i, j), part, scores)
    torch.testing.assert_close(ours, scores.softmax(-1) @ v, atol=2e-5, rtol=1e-5)


def test_the_model_refuses_a_method_its_encoding_cannot_serve():
    model = Transformer(ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=1, rope=position_config("cope")))
    with pytest.raises(ValueError, match="^attention: self_extend gives parts of the scores their own positions"):
        model.hidden_states(torch.zeros(1, 12, dtype=torch.long), attention=attention_method("self_extend"))


def test_attention_with_lse_reports_rows_that_see_nothing():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, lse = attention_with_lse(q, k, v, mask)
        scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)
        assert bool(torch.isneginf(lse[:, :, 1]).all())
        torch.testing.assert_close(lse[:, :, [0, 2, 3]], scores.logsumexp(-1)[:, :, [0, 2, 3]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, :, 0], (scores.softmax(-1) @ v.repeat_interleave(2, 1))[:, :, 0], atol=1e-5, rtol=1e-5)


ENCODINGS = {"complex": RotaryConfig("complex"), "xpos": RotaryConfig("rotate_half", xpos_scale_base=16.0),
             "alibi": position_config("alibi"), "t5": position_config("t5"), "none": position_config("none"),
             "fire": position_config("fire")}


@pytest.mark.parametrize("rows", [256, 4])  # whole masks; blocks of 4 queries, each over the keys it sees
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("name", sorted(ATTENTION_METHODS))
def test_decoding_with_a_cache_equals_the_full_forward(encoding, name, rows, monkeypatch):
    monkeypatch.setattr(minillm.model.transformer, "PATTERN_ROWS", rows)
    rope = ENCODINGS[encoding]
    method = attention_method(name)
    if method.needs == "rotary" and not rope.is_rotary:
        pytest.skip(f"{name} is for rotary encodings")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, context_length=TRAINED, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, rope=rope, nope_every=2 if encoding == "complex" else None)).eval()
    idx = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.hidden_states(idx, attention=method)
        cache = KVCache(2)
        chunks = [model.hidden_states(idx[:, :13], cache, attention=method)]
        chunks += [model.hidden_states(idx[:, t:t + 1], cache, attention=method) for t in range(13, 40)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=2e-5, rtol=1e-5)


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op produced while active (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("name", ["self_extend", "rerope", "lm_infinite", "sinks"])
def test_long_evaluations_hold_no_length_squared_tensor(name, monkeypatch):
    """With a small mask budget the largest tensor grows linearly in the length (the feed-forward's activations
    are the largest then): doubling it doubles the peak, and it stays far from one (length × length) matrix."""
    monkeypatch.setattr(minillm.model.transformer, "MASK_BUDGET", 2**14)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, context_length=TRAINED, d_model=32, n_layers=1, n_heads=4,
                                    rope=RotaryConfig("complex"))).eval()
    peaks = {}
    for length in (1024, 2048):
        idx = torch.randint(0, 61, (1, length), generator=torch.Generator().manual_seed(2))
        with torch.no_grad(), LargestTensor() as probe:
            model.token_losses(idx, idx, attention=attention_method(name))
        peaks[length] = probe.largest
    assert peaks[2048] <= 2048**2 / 8
    assert peaks[2048] <= 2.1 * peaks[1024]


@pytest.mark.parametrize("name, settings, setting", [
    ("self_extend", {"group": 0}, "methods.self_extend.group"),
    ("self_extend", {"window": 0}, "methods.self_extend.window"),
    ("rerope", {"window": 0}, "methods.rerope.window"),
    ("leaky_rerope", {"k": 0.0}, "methods.leaky_rerope.k"),
    ("leaky_rerope", {"k": -2.0}, "methods.leaky_rerope.k"),
    ("lm_infinite", {"n_global": -1}, "methods.lm_infinite.n_global"),
    ("sinks", {"start": -1}, "methods.sinks.start"),
    ("sinks", {"recent": 0}, "methods.sinks.recent"),
    ("sliding", {"window": 0}, "methods.sliding.window"),
])
def test_bad_knobs_name_themselves(name, settings, setting):
    with pytest.raises(ValueError, match=rf"^{setting.replace('.', '[.]')}:"):
        attention_method(name, settings)


@pytest.mark.parametrize("name, settings, setting", [
    ("self_extend", {"window": 8}, "methods.self_extend.window"),  # W ≥ the training length
    ("rerope", {"window": 9}, "methods.rerope.window"),
    ("lm_infinite", {"n_local": 9}, "methods.lm_infinite.n_local"),
    ("lm_infinite", {"limit": 12}, "methods.lm_infinite.limit"),
    ("sinks", {"start": 8}, "methods.sinks.start"),
])
def test_knobs_past_the_training_length_name_themselves(name, settings, setting):
    with pytest.raises(ValueError, match=rf"^{setting.replace('.', '[.]')}:"):
        check_encoding(attention_method(name, settings), RotaryConfig(), TRAINED)


@pytest.mark.parametrize("name, rope", [("rerope", "alibi"), ("leaky_rerope", "none"), ("self_extend", "sinusoidal"),
                                        ("sinks", "learned"), ("lm_infinite", "cope")])
def test_a_method_on_an_encoding_it_cannot_serve_is_refused(name, rope):
    with pytest.raises(ValueError, match=rf"^attention: {name} "):
        check_encoding(attention_method(name), position_config(rope), TRAINED)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"^attention: got 'dilated', expected one of \['blockwise'"):
        attention_method("dilated")


def test_registry_lists_the_methods_in_report_order():
    assert list(ATTENTION_METHODS) == ["full", "blockwise", "sliding", "self_extend", "rerope", "leaky_rerope",
                                       "lm_infinite", "sinks"]
