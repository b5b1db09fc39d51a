"""Extrapolation measurements in-process: attention patterns, windows, perplexity, scaling, passkey, RoPE theory."""

from __future__ import annotations

import _pydecimal
import inspect
import json.decoder
import math
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minillm import evaluation as ev
from minillm.attention import attention_method
from minillm.config import ModelConfig
from minillm.data import train_tokenizer
from minillm.model import Transformer
from minillm.rope import ALiBi, RotaryEmbedding, position_config
from minillm.scaling import LinearScaling, Scaling, YarnScaling

CPU = torch.device("cpu")


def tiny_model(rope=None, context_length: int = 8, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, context_length=context_length, d_model=16, n_layers=2, n_heads=2,
                      **({"rope": rope} if rope is not None else {}))
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper attention than at initialisation, so that positions matter to the loss
        for block in model.blocks:
            block.attn.qkv.weight.mul_(20)
    return model


def random_tokens(n_docs: int, total: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(vocab, (n_docs, total + 1), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Attention patterns inside the evaluation


@pytest.mark.parametrize("rope", [None, position_config("alibi")], ids=["complex", "alibi"])
def test_restricted_attention_within_the_window_equals_full(rope):
    model = tiny_model(rope)
    tokens = random_tokens(2, 32)
    for mode in ("sliding", "blockwise"):
        for length in (4, 8):  # ≤ the training length (8)
            full = ev.perplexity_at_length(model, tokens, length, attention="full")
            restricted = ev.perplexity_at_length(model, tokens, length, attention=mode)
            assert restricted.loss == pytest.approx(full.loss, abs=1e-6)
    # Past the window the patterns differ, but only for queries that could see further back than it.
    x, y = tokens[:, :16], tokens[:, 1:17]
    with torch.inference_mode():
        full = model.token_losses(x, y)
        sliding = model.token_losses(x, y, attention=attention_method("sliding"))
    torch.testing.assert_close(sliding[:, :8], full[:, :8])
    assert not torch.allclose(sliding[:, 8:], full[:, 8:])


@pytest.mark.parametrize("name", ["self_extend", "rerope", "lm_infinite", "sinks"])
def test_training_free_methods_leave_the_training_length_alone(name):
    """Below the training length every method is plain attention (ReRoPE's and Self-Extend's windows are L/2, so
    theirs only below that)."""
    model = tiny_model(context_length=16)
    tokens = random_tokens(2, 32)
    within = 8 if name in ("self_extend", "rerope") else 12
    full = ev.perplexity_at_length(model, tokens, within, attention="full")
    method = ev.perplexity_at_length(model, tokens, within, attention=name)
    assert method.loss == pytest.approx(full.loss, abs=1e-5)
    assert ev.perplexity_at_length(model, tokens, 32, attention=name).loss != \
        pytest.approx(ev.perplexity_at_length(model, tokens, 32, attention="full").loss, abs=1e-4)


def test_tail_loss_scores_the_same_last_targets_at_every_length():
    model = tiny_model()
    tokens = random_tokens(3, 32)
    for length in (8, 16, 32):
        loss, count = ev.tail_loss(model, tokens, length, 8)
        with torch.inference_mode():
            direct = model.token_losses(tokens[:, 32 - length:32], tokens[:, 33 - length:33])[:, -8:]
        assert count == 24 and loss == pytest.approx(float(direct.mean()), rel=1e-6)
    # at the shortest context the targets are a whole window: the same as the last window's perplexity targets
    with torch.inference_mode():
        last_window = model.token_losses(tokens[:, 24:32], tokens[:, 25:33]).mean()
    assert ev.tail_loss(model, tokens, 8, 8)[0] == pytest.approx(float(last_window), rel=1e-6)
    with pytest.raises(ValueError, match="length: a window of 4 tokens cannot score the last 8"):
        ev.tail_loss(model, tokens, 4, 8)


def test_log_n_queries_equal_a_model_built_with_them_and_are_undone():
    model = tiny_model(context_length=8)
    built = Transformer(ModelConfig(**{**model.cfg.to_dict(), "attn_temperature": "logn"})).eval()
    built.load_state_dict(model.state_dict())
    tokens = random_tokens(1, 32)
    with torch.inference_mode():
        plain = model.token_losses(tokens[:, :32], tokens[:, 1:])
        with ev.log_n_queries(model, True):
            scaled = model.token_losses(tokens[:, :32], tokens[:, 1:])
        torch.testing.assert_close(scaled, built.token_losses(tokens[:, :32], tokens[:, 1:]))
        torch.testing.assert_close(model.token_losses(tokens[:, :32], tokens[:, 1:]), plain)
    torch.testing.assert_close(scaled[:, :8], plain[:, :8])  # a factor of 1 up to the training length
    with pytest.raises(ValueError, match="logn: the model already scales its queries"):
        with ev.log_n_queries(built, True):
            pass


# ----------------------------------------------------------------------------------------------
# Windows


def test_windows_cover_the_same_targets_for_every_length_dividing_the_total():
    tokens = torch.arange(3 * 65).view(3, 65)  # token value = its index: targets name their positions
    expected = sorted(tokens[:, 1:].flatten().tolist())
    for length in (1, 2, 4, 8, 16, 32, 64):
        inputs, targets = ev.windows(tokens, length)
        assert inputs.shape == targets.shape == (3 * 64 // length, length)
        assert sorted(targets.flatten().tolist()) == expected
        torch.testing.assert_close(targets - 1, inputs)  # each target follows its input
    _, targets = ev.windows(tokens, 24)  # not a divisor: two whole windows per document, the rest left out
    assert targets.shape == (6, 24) and targets[:2].flatten().tolist() == list(range(1, 49))


@pytest.mark.parametrize("total", [50, 64, 100])
@pytest.mark.parametrize("stride", [1, 5, 8, 15])
def test_window_plan_with_stride_scores_every_target_once_with_enough_context(total, stride):
    length = 16
    plan = ev._window_plan(total, length, stride)
    scored = np.zeros(total, dtype=int)
    for i, (begin, end, scored_from) in enumerate(plan):
        assert 0 <= begin < end <= total and end - begin <= length
        scored[begin + scored_from:end] += 1
        if i == 0:
            assert (begin, scored_from) == (0, 0)
        else:
            assert scored_from >= length - stride  # every scored target sees ≥ length − stride tokens
            assert begin == plan[i - 1][0] + stride
    assert (scored == 1).all()


def test_window_plan_without_stride_and_bad_strides():
    assert ev._window_plan(50, 16, None) == [(0, 16, 0), (16, 32, 0), (32, 48, 0)]
    assert ev._window_plan(50, 16, 16) == ev._window_plan(50, 16, 64) == ev._window_plan(50, 16, None)
    assert ev._window_plan(10, 16, None) == []
    for stride in (0, -3):
        with pytest.raises(ValueError, match="stride: must be positive"):
            ev._window_plan(50, 16, stride)
    with pytest.raises(ValueError, match="length: must be positive"):
        ev._window_plan(50, 0, None)


def test_evaluation_tokens_takes_the_start_of_long_enough_documents():
    documents = [np.arange(10), np.arange(100, 130), np.arange(200, 221), np.arange(300, 340)]
    tokens = ev.evaluation_tokens(documents, 20, max_documents=2)
    assert tokens.tolist() == [list(range(100, 121)), list(range(200, 221))]
    with pytest.raises(ValueError, match="no validation document has 41 tokens"):
        ev.evaluation_tokens(documents, 40, max_documents=2)


# ----------------------------------------------------------------------------------------------
# Perplexity at a length


def test_perplexity_equals_a_hand_computation():
    model = tiny_model()  # trained length 8
    tokens = random_tokens(3, 64)
    with torch.inference_mode():
        window_losses = torch.cat([model.token_losses(tokens[:, b:b + 16], tokens[:, b + 1:b + 17])
                                   for b in range(0, 64, 16)])  # (windows·docs, 16)
    result = ev.perplexity_at_length(model, tokens, 16, batch_size=2, buckets=4)
    assert result.loss == pytest.approx(float(window_losses.mean()), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(result.loss))
    assert result.tokens == 3 * 64
    assert result.loss_beyond_train == pytest.approx(float(window_losses[:, 8:].mean()), rel=1e-6)
    buckets = [(b.position_start, b.position_end) for b in result.by_position]
    assert buckets == [(0, 4), (4, 8), (8, 12), (12, 16)]
    for bucket in result.by_position:
        lo, hi = bucket.position_start, bucket.position_end
        assert bucket.loss == pytest.approx(float(window_losses[:, lo:hi].mean()), rel=1e-6)
        assert bucket.tokens == 3 * 4 * (hi - lo)
    assert result.seconds >= 0 and result.peak_memory_mb > 0


def test_perplexity_scores_only_whole_windows():
    """A length that does not divide the total: the remainder is left out, not averaged in as zeros."""
    model = tiny_model()
    tokens = random_tokens(2, 64)
    with torch.inference_mode():
        hand = torch.cat([model.token_losses(tokens[:, b:b + 24], tokens[:, b + 1:b + 25]) for b in (0, 24)])
    result = ev.perplexity_at_length(model, tokens, 24)
    assert result.tokens == 2 * 48
    assert result.loss == pytest.approx(float(hand.mean()), rel=1e-6)


def test_perplexity_with_stride_equals_a_hand_computation():
    model = tiny_model()
    tokens = random_tokens(2, 64)
    with torch.inference_mode():
        losses = [model.token_losses(tokens[:, :16], tokens[:, 1:17])]  # the first window: every target
        for begin in range(8, 64 - 16 + 1, 8):  # then the last 8 targets of windows advancing by 8
            losses.append(model.token_losses(tokens[:, begin:begin + 16], tokens[:, begin + 1:begin + 17])[:, 8:])
        hand = torch.cat(losses, dim=1)
    result = ev.perplexity_at_length(model, tokens, 16, stride=8)
    assert result.tokens == 2 * 64
    assert result.loss == pytest.approx(float(hand.mean()), rel=1e-6)
    beyond = torch.cat([losses[0][:, 8:], *losses[1:]], dim=1)  # positions 8.. of each window (trained length 8)
    assert result.loss_beyond_train == pytest.approx(float(beyond.mean()), rel=1e-6)


def test_long_windows_go_through_in_smaller_batches(monkeypatch):
    """At most MAX_ATTENTION_PAIRS query-key pairs per forward pass; the numbers do not change."""
    model = tiny_model()
    tokens = random_tokens(4, 32)
    reference = ev.perplexity_at_length(model, tokens, 16, batch_size=4)
    batches = []
    original = model.token_losses
    monkeypatch.setattr(model, "token_losses", lambda x, y, **kw: batches.append(len(x)) or original(x, y, **kw))
    monkeypatch.setattr(ev, "MAX_ATTENTION_PAIRS", 2 * 16**2)
    result = ev.perplexity_at_length(model, tokens, 16, batch_size=4)
    assert set(batches) == {2}
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)


def test_loss_beyond_train_counts_only_positions_past_the_trained_length():
    model = tiny_model()
    tokens = random_tokens(2, 32)
    assert ev.perplexity_at_length(model, tokens, 8).loss_beyond_train is None  # nothing past 8 in a window of 8
    result = ev.perplexity_at_length(model, tokens, 32, buckets=32)
    per_position = {b.position_start: b.loss for b in result.by_position}
    assert result.loss_beyond_train == pytest.approx(np.mean([per_position[p] for p in range(8, 32)]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Inference-time scaling


def test_scaled_rope_swaps_the_encoding_and_restores_it():
    model = tiny_model()
    original = model.position
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(1, 32)
    plain = ev.perplexity_at_length(model, tokens, 32).loss
    with ev.scaled_rope(model, LinearScaling(factor=4.0, original_max_position=8)) as scaled:
        assert scaled is model and isinstance(model.position, RotaryEmbedding) and model.position is not original
        assert model.position.scaling == LinearScaling(factor=4.0, original_max_position=8)
        torch.testing.assert_close(model.position.inv_freq, original.inv_freq / 4)
        assert ev.perplexity_at_length(model, tokens, 32).loss != pytest.approx(plain)
    assert model.position is original
    assert ev.perplexity_at_length(model, tokens, 32).loss == pytest.approx(plain)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    with pytest.raises(RuntimeError, match="boom"), ev.scaled_rope(model, YarnScaling(original_max_position=8)):
        raise RuntimeError("boom")
    assert model.position is original  # restored on errors too
    with ev.scaled_rope(model, Scaling()):
        assert model.position is original


def test_scaled_rope_needs_a_rotary_model():
    model = tiny_model(position_config("alibi"))
    with pytest.raises(ValueError, match="scaling: 'linear' needs a rotary model, this one uses ALiBi"):
        with ev.scaled_rope(model, LinearScaling(factor=2.0)):
            pass
    with ev.scaled_rope(model, Scaling()):
        assert isinstance(model.position, ALiBi)


def test_scaling_factor_rules():
    factor = lambda *args: ev.scaling_for(*args).factor  # noqa: E731
    assert factor("linear", 64, 16, None) == 4.0
    assert factor("yarn", 24, 16, None) == 1.5
    assert factor("ntk", 8, 16, None) == 1.0  # never below 1: no compression at short lengths
    assert factor("dynamic_ntk", 64, 16, None) == 1.0  # its base follows the length already
    assert factor("linear", 64, 16, 2.5) == 2.5
    assert factor("dynamic_ntk", 64, 16, 2.5) == 2.5
    assert ev.scaling_for("yarn", 64, 16, None).original_max_position == 16  # the trained length
    assert ev.scaling_for("none", 64, 16, 2.5) == Scaling()


# ----------------------------------------------------------------------------------------------
# Passkey retrieval


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token byte-level BPE trained on a few standard-library modules (digits included)."""
    texts = [Path(module.__file__).read_text() for module in (inspect, _pydecimal, json.decoder)]
    return train_tokenizer(texts, 300, 2)


@pytest.fixture(scope="module")
def filler(tokenizer) -> np.ndarray:
    return np.asarray(tokenizer.encode(Path(textwrap.__file__).read_text()).ids, dtype=np.int64)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("length", [120, 300])
def test_passkey_prompt_puts_the_key_at_the_requested_depth(tokenizer, filler, depth, length):
    rng = np.random.default_rng(7)
    prompt = ev.passkey_prompt(tokenizer, filler, length, depth, rng)
    assert len(prompt.tokens) == length
    assert len(prompt.key) == 5 and prompt.key.isdigit() and 10000 <= int(prompt.key) < 100000
    intro = tokenizer.encode(ev.PASSKEY_INTRO.format(key=prompt.key)).ids
    question = tokenizer.encode(ev.PASSKEY_QUESTION).ids
    n_filler = prompt.answer_start - len(intro) - len(question)
    assert prompt.key_position == round(depth * n_filler)
    tokens = prompt.tokens.tolist()
    key_sentence = tokens[prompt.key_position:prompt.key_position + len(intro)]
    assert key_sentence == intro and f"The pass key is {prompt.key}." in tokenizer.decode(key_sentence)
    assert tokens[prompt.answer_start - len(question):prompt.answer_start] == question
    assert tokenizer.decode(tokens[prompt.answer_start:]) == " " + prompt.key
    # Around the key sentence, one contiguous stretch of the corpus.
    around = tokens[:prompt.key_position] + tokens[prompt.key_position + len(intro):prompt.answer_start - len(question)]
    assert len(around) == n_filler
    starts = [i for i in range(len(filler) - n_filler + 1) if filler[i] == around[0]]
    assert any(filler[i:i + n_filler].tolist() == around for i in starts)


def test_passkey_prompt_refuses_what_does_not_fit(tokenizer, filler):
    rng = np.random.default_rng(0)
    with pytest.raises(ev.PasskeyDoesNotFit, match="passkey: a prompt of 20 tokens leaves no room for filler"):
        ev.passkey_prompt(tokenizer, filler, 20, 0.5, rng)
    with pytest.raises(ev.PasskeyDoesNotFit, match="filler tokens needed"):
        ev.passkey_prompt(tokenizer, filler[:10], 200, 0.5, rng)
    with pytest.raises(ValueError, match="depth: must lie in"):
        ev.passkey_prompt(tokenizer, filler, 200, 1.5, rng)
    assert issubclass(ev.PasskeyDoesNotFit, ValueError)


class Oracle(nn.Module):
    """A stand-in model whose logits put `margin` on the true next token (or, at `wrong`, on another one)."""

    def __init__(self, sequence: torch.Tensor, vocab: int, margin: float = 5.0, wrong: int | None = None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so that next(model.parameters()) gives the device
        self.sequence, self.vocab, self.margin, self.wrong = sequence, vocab, margin, wrong

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.arange(idx.shape[1], dtype=torch.float32)[None, :, None].expand(idx.shape[0], -1, 1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        position = hidden[..., 0].long()
        target = self.sequence[position + 1]
        if self.wrong is not None:
            target = torch.where(position + 1 == self.wrong, (target + 1) % self.vocab, target)
        return nn.functional.one_hot(target, self.vocab).float() * self.margin


def test_passkey_trial_with_a_rigged_model(tokenizer, filler):
    prompt = ev.passkey_prompt(tokenizer, filler, 150, 0.5, np.random.default_rng(3))
    vocab, margin = tokenizer.get_vocab_size(), 5.0
    n_answer = len(prompt.tokens) - prompt.answer_start
    per_token = margin - math.log(math.exp(margin) + vocab - 1)  # log-softmax of the boosted logit
    exact, logprob = ev.passkey_trial(Oracle(prompt.tokens, vocab, margin), prompt)
    assert exact is True
    assert logprob == pytest.approx(n_answer * per_token, rel=1e-5) and logprob <= 0
    exact, logprob = ev.passkey_trial(Oracle(prompt.tokens, vocab, margin, wrong=len(prompt.tokens) - 1), prompt)
    assert exact is False  # the last key token is not the argmax
    miss = -math.log(math.exp(margin) + vocab - 1)  # log-softmax of an unboosted logit
    assert logprob == pytest.approx((n_answer - 1) * per_token + miss, rel=1e-5)


def test_passkey_trial_equals_a_hand_computation_with_a_real_model(tokenizer, filler):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), context_length=64, d_model=16,
                                    n_layers=1, n_heads=2)).eval()
    prompt = ev.passkey_prompt(tokenizer, filler, 128, 0.25, np.random.default_rng(1))
    exact, logprob = ev.passkey_trial(model, prompt)
    with torch.inference_mode():
        logits = model(prompt.tokens[None, :-1])[0]
    answer = prompt.tokens[prompt.answer_start:]
    rows = logits[prompt.answer_start - 1:].log_softmax(-1)
    assert logprob == pytest.approx(float(rows.gather(-1, answer[:, None]).sum()), rel=1e-5) and logprob <= 0
    assert exact == bool((rows.argmax(-1) == answer).all())


def test_a_scaling_that_changes_nothing_at_a_length_reuses_the_measurement(monkeypatch):
    """Up to the training length every static scaling has factor 1 and rotates as none does: one measurement
    per distinct set of frequencies, the same numbers in every row, and past it each scaling its own."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2)).eval()
    documents = [np.random.default_rng(0).integers(0, 64, 200)]
    subject = ev.Subject(model, None, documents, ev.ModelInfo("m", "m", 0, 16, "complex", "-"))
    calls = []
    measure = ev.perplexity_at_length
    monkeypatch.setattr(ev, "perplexity_at_length", lambda *a, **k: calls.append(a[2]) or measure(*a, **k))
    config = ev.EvalConfig(ckpt="-", lengths=[8, 16, 32], scalings=["none", "linear", "yarn", "dynamic_ntk"],
                           passkey_trials=0, tail_loss=False)
    results = ev.measure(subject, config)
    assert sorted(calls) == [8, 16, 32, 32, 32, 32]  # dynamic NTK at factor 1 past L0 still changes the base
    ppl = {(r.method, r.length): r.ppl for r in results.perplexity}
    for length in (8, 16):
        assert len({ppl[m, length] for m in config.scalings}) == 1
    assert len({ppl[m, 32] for m in config.scalings}) == 4
