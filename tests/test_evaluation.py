"""Extrapolation measurements in-process: attention patterns, windows, perplexity, scaling, passkey, RoPE theory,
task accuracy and effective length."""

from __future__ import annotations

import _pydecimal
import dataclasses
import inspect
import json.decoder
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from minillm.eval.perplexity import PerplexityRecord, _window_plan, evaluation_tokens, rotary_key, scaling_for, windows
from minillm.eval.passkey import PASSKEY_INTRO, PASSKEY_QUESTION, PasskeyDoesNotFit, PasskeyPrompt, passkey_prompt, passkey_trial
from minillm.eval.sources import Subject, model_sources
from minillm.eval.records import Results, Setting
from minillm.eval.loop import measure
from minillm.eval.report import write_report
from minillm.eval.measurement import MEASUREMENTS
from minillm.eval.passkey import PasskeyRecord
from minillm.eval.tail import TailLossRecord, tail_loss
from minillm.eval.theory import TheoryRecord
from minillm.eval.longppl import LongPPLRecord  # noqa: F401  (registers the measurement)
import minillm.eval.loop as loop_module
import minillm.eval.perplexity as perplexity_module
import minillm.eval.tasks as tasks_module
from minillm.eval.tasks import (AccuracyRecord, EffectiveLengthRecord, effective_length, effective_lengths,
                                task_accuracy)
from minillm.eval.perplexity import perplexity_at_length
from minillm.positions.methods import attention_method
from minillm.eval.config import EvalConfig
from minillm.tracking import LoggerConfig
from minillm.model.config import ModelConfig
from minillm.data.tokens import train_tokenizer
from minillm.model.transformer import Transformer
from minillm.positions.base import position_config
from minillm.positions.scaling import LinearScaling, Scaling
from minillm.data.synthetic import IGNORE, MQAR, FlipFlop, Needle
from minillm.data.answers import accuracy, answer_loss, validation_set

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
            full = perplexity_at_length(model, tokens, length, attention="full")
            restricted = perplexity_at_length(model, tokens, length, attention=mode)
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
    full = perplexity_at_length(model, tokens, within, attention="full")
    method = perplexity_at_length(model, tokens, within, attention=name)
    assert method.loss == pytest.approx(full.loss, abs=1e-5)
    assert perplexity_at_length(model, tokens, 32, attention=name).loss != \
        pytest.approx(perplexity_at_length(model, tokens, 32, attention="full").loss, abs=1e-4)


def test_tail_loss_scores_the_same_last_targets_at_every_length():
    model = tiny_model()
    tokens = random_tokens(3, 32)
    for length in (8, 16, 32):
        loss, count = tail_loss(model, tokens, length, 8)
        with torch.inference_mode():
            direct = model.token_losses(tokens[:, 32 - length:32], tokens[:, 33 - length:33])[:, -8:]
        assert count == 24 and loss == pytest.approx(float(direct.mean()), rel=1e-6)
    # at the shortest context the targets are a whole window: the same as the last window's perplexity targets
    with torch.inference_mode():
        last_window = model.token_losses(tokens[:, 24:32], tokens[:, 25:33]).mean()
    assert tail_loss(model, tokens, 8, 8)[0] == pytest.approx(float(last_window), rel=1e-6)
    with pytest.raises(ValueError, match="length: a window of 4 tokens cannot score the last 8"):
        tail_loss(model, tokens, 4, 8)


def test_log_n_given_to_the_forward_equals_a_model_built_with_it_and_leaves_the_model_unchanged():
    model = tiny_model(context_length=8)
    built = Transformer(ModelConfig(**{**model.cfg.to_dict(), "attn_temperature": "logn"})).eval()
    built.load_state_dict(model.state_dict())
    tokens = random_tokens(1, 32)
    with torch.inference_mode():
        plain = model.token_losses(tokens[:, :32], tokens[:, 1:])
        scaled = model.token_losses(tokens[:, :32], tokens[:, 1:], logn=True)
        torch.testing.assert_close(scaled, built.token_losses(tokens[:, :32], tokens[:, 1:]))
        torch.testing.assert_close(model.token_losses(tokens[:, :32], tokens[:, 1:]), plain)
    assert all(block.attn.temperature is None for block in model.blocks)  # read as data: no module was set
    torch.testing.assert_close(scaled[:, :8], plain[:, :8])  # a factor of 1 up to the training length
    with pytest.raises(ValueError, match="logn: the model already scales its queries"):
        built.token_losses(tokens[:, :32], tokens[:, 1:], logn=True)


# ----------------------------------------------------------------------------------------------
# Windows


def test_windows_cover_the_same_targets_for_every_length_dividing_the_total():
    tokens = torch.arange(3 * 65).view(3, 65)  # token value = its index: targets name their positions
    expected = sorted(tokens[:, 1:].flatten().tolist())
    for length in (1, 2, 4, 8, 16, 32, 64):
        inputs, targets = windows(tokens, length)
        assert inputs.shape == targets.shape == (3 * 64 // length, length)
        assert sorted(targets.flatten().tolist()) == expected
        torch.testing.assert_close(targets - 1, inputs)  # each target follows its input
    _, targets = windows(tokens, 24)  # not a divisor: two whole windows per document, the rest left out
    assert targets.shape == (6, 24) and targets[:2].flatten().tolist() == list(range(1, 49))


@pytest.mark.parametrize("total", [50, 64, 100])
@pytest.mark.parametrize("stride", [1, 5, 8, 15])
def test_window_plan_with_stride_scores_every_target_once_with_enough_context(total, stride):
    length = 16
    plan = _window_plan(total, length, stride)
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
    assert _window_plan(50, 16, None) == [(0, 16, 0), (16, 32, 0), (32, 48, 0)]
    assert _window_plan(50, 16, 16) == _window_plan(50, 16, 64) == _window_plan(50, 16, None)
    assert _window_plan(10, 16, None) == []
    for stride in (0, -3):
        with pytest.raises(ValueError, match="stride: must be positive"):
            _window_plan(50, 16, stride)
    with pytest.raises(ValueError, match="length: must be positive"):
        _window_plan(50, 0, None)


def test_evaluation_tokens_takes_the_start_of_long_enough_documents():
    documents = [np.arange(10), np.arange(100, 130), np.arange(200, 221), np.arange(300, 340)]
    tokens = evaluation_tokens(documents, 20, max_documents=2)
    assert tokens.tolist() == [list(range(100, 121)), list(range(200, 221))]
    with pytest.raises(ValueError, match="no validation document has 41 tokens"):
        evaluation_tokens(documents, 40, max_documents=2)


# ----------------------------------------------------------------------------------------------
# Perplexity at a length


def test_perplexity_equals_a_hand_computation():
    model = tiny_model()  # trained length 8
    tokens = random_tokens(3, 64)
    with torch.inference_mode():
        window_losses = torch.cat([model.token_losses(tokens[:, b:b + 16], tokens[:, b + 1:b + 17])
                                   for b in range(0, 64, 16)])  # (windows·docs, 16)
    result = perplexity_at_length(model, tokens, 16, batch_size=2, buckets=4)
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
    result = perplexity_at_length(model, tokens, 24)
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
    result = perplexity_at_length(model, tokens, 16, stride=8)
    assert result.tokens == 2 * 64
    assert result.loss == pytest.approx(float(hand.mean()), rel=1e-6)
    beyond = torch.cat([losses[0][:, 8:], *losses[1:]], dim=1)  # positions 8.. of each window (trained length 8)
    assert result.loss_beyond_train == pytest.approx(float(beyond.mean()), rel=1e-6)


def test_long_windows_go_through_in_smaller_batches(monkeypatch):
    """At most MAX_ATTENTION_PAIRS query-key pairs per forward pass; the numbers do not change."""
    model = tiny_model()
    tokens = random_tokens(4, 32)
    reference = perplexity_at_length(model, tokens, 16, batch_size=4)
    batches = []
    original = model.token_losses
    monkeypatch.setattr(model, "token_losses", lambda x, y, **kw: batches.append(len(x)) or original(x, y, **kw))
    monkeypatch.setattr(perplexity_module, "MAX_ATTENTION_PAIRS", 2 * 16**2)
    result = perplexity_at_length(model, tokens, 16, batch_size=4)
    assert set(batches) == {2}
    assert result.loss == pytest.approx(reference.loss, rel=1e-6)


def test_loss_beyond_train_counts_only_positions_past_the_trained_length():
    model = tiny_model()
    tokens = random_tokens(2, 32)
    assert perplexity_at_length(model, tokens, 8).loss_beyond_train is None  # nothing past 8 in a window of 8
    result = perplexity_at_length(model, tokens, 32, buckets=32)
    per_position = {b.position_start: b.loss for b in result.by_position}
    assert result.loss_beyond_train == pytest.approx(np.mean([per_position[p] for p in range(8, 32)]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Inference-time scaling


def test_a_scaling_given_to_the_forward_reads_the_model_with_it_and_touches_nothing():
    model = tiny_model()
    original = model.position
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(1, 32)
    plain = perplexity_at_length(model, tokens, 32).loss
    linear = LinearScaling(factor=4.0, original_max_position=8)
    assert perplexity_at_length(model, tokens, 32, scaling=linear).loss != pytest.approx(plain)
    # the same numbers as a model built with that scaling from the start, on the same weights
    built = Transformer(dataclasses.replace(model.cfg, rope_scaling=linear)).eval()
    built.load_state_dict(model.state_dict())
    assert perplexity_at_length(model, tokens, 32, scaling=linear).loss == \
        pytest.approx(perplexity_at_length(built, tokens, 32).loss, rel=1e-6)
    assert model.position is original
    assert perplexity_at_length(model, tokens, 32).loss == pytest.approx(plain)
    assert perplexity_at_length(model, tokens, 32, scaling=Scaling()).loss == pytest.approx(plain)
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    key = rotary_key(model, linear, 32)
    inv_freq, factor = linear.frequencies(original.theta, original.rotary_dim, 32)
    assert key == (inv_freq.numpy().tobytes(), factor) and key != rotary_key(model, Scaling(), 32)


@pytest.mark.parametrize("variant", ["pope", "fope"])
def test_every_rotary_encoding_is_measured_again_under_each_scaling(variant):
    """The loop measures a setting once per rotary_key: PoPE's and FoPE's scalings change the forward, so their keys
    differ from the model as built, and equal ones (factor 1 within the training length) give equal losses."""
    model = tiny_model(position_config(variant))
    tokens = random_tokens(1, 32)
    plain = perplexity_at_length(model, tokens, 32).loss
    yarn = scaling_for("yarn", 32, model.cfg.context_length, 4.0)
    assert rotary_key(model, yarn, 32) != rotary_key(model, Scaling(), 32)
    assert perplexity_at_length(model, tokens, 32, scaling=yarn).loss != pytest.approx(plain)
    identity = LinearScaling(factor=1.0, original_max_position=model.cfg.context_length)
    assert rotary_key(model, identity, 32) == rotary_key(model, Scaling(), 32)
    assert perplexity_at_length(model, tokens, 32, scaling=identity).loss == pytest.approx(plain, rel=1e-6)


def test_a_scaling_needs_a_rotary_model():
    model = tiny_model(position_config("alibi"))
    tokens = random_tokens(1, 32)
    with pytest.raises(ValueError, match="scaling: 'linear' needs a rotary model, this one uses ALiBi"):
        perplexity_at_length(model, tokens, 32, scaling=LinearScaling(factor=2.0))
    assert perplexity_at_length(model, tokens, 32, scaling=Scaling()).loss == \
        pytest.approx(perplexity_at_length(model, tokens, 32).loss)
    assert rotary_key(model, Scaling(), 32) is None


def test_scaling_factor_rules():
    factor = lambda *args: scaling_for(*args).factor  # noqa: E731
    assert factor("linear", 64, 16, None) == 4.0
    assert factor("yarn", 24, 16, None) == 1.5
    assert factor("ntk", 8, 16, None) == 1.0  # never below 1: no compression at short lengths
    assert factor("dynamic_ntk", 64, 16, None) == 1.0  # its base follows the length already
    assert factor("linear", 64, 16, 2.5) == 2.5
    assert factor("dynamic_ntk", 64, 16, 2.5) == 2.5
    assert scaling_for("yarn", 64, 16, None).original_max_position == 16  # the trained length
    assert scaling_for("none", 64, 16, 2.5) == Scaling()


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
    prompt = passkey_prompt(tokenizer, filler, length, depth, rng)
    assert len(prompt.tokens) == length
    assert len(prompt.key) == 5 and prompt.key.isdigit() and 10000 <= int(prompt.key) < 100000
    intro = tokenizer.encode(PASSKEY_INTRO.format(key=prompt.key)).ids
    question = tokenizer.encode(PASSKEY_QUESTION).ids
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
    with pytest.raises(PasskeyDoesNotFit, match="passkey: a prompt of 20 tokens leaves no room for filler"):
        passkey_prompt(tokenizer, filler, 20, 0.5, rng)
    with pytest.raises(PasskeyDoesNotFit, match="filler tokens needed"):
        passkey_prompt(tokenizer, filler[:10], 200, 0.5, rng)
    with pytest.raises(ValueError, match="depth: must lie in"):
        passkey_prompt(tokenizer, filler, 200, 1.5, rng)
    assert issubclass(PasskeyDoesNotFit, ValueError)


class Oracle(nn.Module):
    """A stand-in model whose logits put `margin` on the true next token (or, at `wrong`, on another one)."""

    def __init__(self, sequence: torch.Tensor, vocab: int, margin: float = 5.0, wrong: int | None = None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so that next(model.parameters()) gives the device
        self.sequence, self.vocab, self.margin, self.wrong = sequence, vocab, margin, wrong

    def hidden_states(self, idx: torch.Tensor, attention=None, scaling=None, logn=False) -> torch.Tensor:
        return torch.arange(idx.shape[1], dtype=torch.float32)[None, :, None].expand(idx.shape[0], -1, 1)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        position = hidden[..., 0].long()
        target = self.sequence[position + 1]
        if self.wrong is not None:
            target = torch.where(position + 1 == self.wrong, (target + 1) % self.vocab, target)
        return nn.functional.one_hot(target, self.vocab).float() * self.margin


def test_passkey_trial_with_a_rigged_model(tokenizer, filler):
    prompt = passkey_prompt(tokenizer, filler, 150, 0.5, np.random.default_rng(3))
    vocab, margin = tokenizer.get_vocab_size(), 5.0
    n_answer = len(prompt.tokens) - prompt.answer_start
    per_token = margin - math.log(math.exp(margin) + vocab - 1)  # log-softmax of the boosted logit
    exact, logprob = passkey_trial(Oracle(prompt.tokens, vocab, margin), prompt)
    assert exact is True
    assert logprob == pytest.approx(n_answer * per_token, rel=1e-5) and logprob <= 0
    exact, logprob = passkey_trial(Oracle(prompt.tokens, vocab, margin, wrong=len(prompt.tokens) - 1), prompt)
    assert exact is False  # the last key token is not the argmax
    miss = -math.log(math.exp(margin) + vocab - 1)  # log-softmax of an unboosted logit
    assert logprob == pytest.approx((n_answer - 1) * per_token + miss, rel=1e-5)


def test_passkey_trial_equals_a_hand_computation_with_a_real_model(tokenizer, filler):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), context_length=64, d_model=16,
                                    n_layers=1, n_heads=2)).eval()
    prompt = passkey_prompt(tokenizer, filler, 128, 0.25, np.random.default_rng(1))
    exact, logprob = passkey_trial(model, prompt)
    with torch.inference_mode():
        logits = model(prompt.tokens[None, :-1])[0]
    answer = prompt.tokens[prompt.answer_start:]
    rows = logits[prompt.answer_start - 1:].log_softmax(-1)
    assert logprob == pytest.approx(float(rows.gather(-1, answer[:, None]).sum()), rel=1e-5) and logprob <= 0
    assert exact == bool((rows.argmax(-1) == answer).all())


def test_passkey_trial_under_an_attention_method_reads_what_the_method_lets_it_see(tokenizer, filler):
    """A sliding window wider than the prompt is full attention; one that ends before the key's sentence leaves the
    key's log-probability as it is with that sentence's tokens replaced, since no query can see them."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), context_length=64, d_model=16,
                                    n_layers=1, n_heads=2)).eval()
    prompt = passkey_prompt(tokenizer, filler, 200, 0.0, np.random.default_rng(1))
    full = passkey_trial(model, prompt)
    assert passkey_trial(model, prompt, attention_method("sliding", {"window": 200})) == pytest.approx(full)
    seen_from = prompt.key_position + len(tokenizer.encode(PASSKEY_INTRO.format(key=prompt.key)).ids) + 1
    # One layer: an answer query at i >= answer_start - 1 reads keys i - window + 1 .. i only.
    narrow = attention_method("sliding", {"window": prompt.answer_start - seen_from})
    assert prompt.answer_start - seen_from >= 8
    blanked = prompt.tokens.clone()
    blanked[:seen_from] = (blanked[:seen_from] + 1) % tokenizer.get_vocab_size()  # tokens no answer query sees
    changed = PasskeyPrompt(blanked, prompt.answer_start, prompt.key_position, prompt.key)
    _, logprob = passkey_trial(model, prompt, narrow)
    assert passkey_trial(model, changed, narrow)[1] == pytest.approx(logprob, rel=1e-6)
    assert abs(passkey_trial(model, changed)[1] - full[1]) > 1e-4  # full attention reads the changed tokens
    assert abs(logprob - full[1]) > 1e-4


def test_a_scaling_that_changes_nothing_at_a_length_reuses_the_measurement(monkeypatch):
    """Up to the training length every static scaling has factor 1 and rotates as none does: one measurement
    per distinct set of frequencies, the same numbers in every row, and past it each scaling its own."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2)).eval()
    documents = [np.random.default_rng(0).integers(0, 64, 200)]
    subject = Subject(model, Setting("m", "m", 0, 16, "complex", "-"), None, documents)
    calls = []
    original = perplexity_at_length
    monkeypatch.setattr(perplexity_module, "perplexity_at_length", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
    config = EvalConfig(ckpt="-", lengths=[8, 16, 32], scalings=["none", "linear", "yarn", "dynamic_ntk"],
                           passkey_trials=0, tail_loss=False)
    results = measure(subject, config)
    assert sorted(calls) == [8, 16, 32, 32, 32, 32]  # dynamic NTK at factor 1 past L0 still changes the base
    ppl = {(r.setting.scaling, r.length): r.ppl for r in results.of(PerplexityRecord)}
    for length in (8, 16):
        assert len({ppl[m, length] for m in config.scalings}) == 1
    assert len({ppl[m, 32] for m in config.scalings}) == 4


# ----------------------------------------------------------------------------------------------
# The measurement registry through the loop


def test_every_measurement_writes_records_with_their_setting_through_the_loop(tokenizer, filler, tmp_path):
    """A rotary text model and a task-trained one through the one loop: every registered measurement gives records of
    its own type, each carrying the whole Setting it was measured in; each measurement's section and tables render,
    and a setting the model cannot serve is a record that does not apply (or none) for each measurement."""
    torch.manual_seed(0)
    text_model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), context_length=128, d_model=16,
                                         n_layers=1, n_heads=2)).eval()
    text = Subject(text_model, Setting(text_model.cfg.label, "text_run", 1, 128, "complex", "t.ckpt"), tokenizer,
                   [filler])
    task = MQAR(num_keys=4, num_values=8, tokens_per_pair=16)
    task_run = task_model(task, context_length=32)
    scored = Subject(task_run, Setting(task_run.cfg.label, "task_run", 2, 32, "complex", "q.ckpt", task="mqar"),
                     task=task)
    config = EvalConfig(ckpt="-", lengths=[128, 256], scalings=["none", "yarn"], attention=["full", "rerope"],
                        logn=True, stride=64, passkey_trials=2, longppl=True, ruler=["niah_single_1"],
                        passkey_depths=[0.5], task_examples=4, max_documents=2, buckets=4)
    results = measure(text, config)
    results.extend(measure(scored, dataclasses.replace(config, lengths=[32, 64])))

    for name, measurement in MEASUREMENTS.items():
        records = results.of(measurement.record)
        assert records and all(type(r) is measurement.record and r.kind == name for r in records), name
        kinds = {"text": "text_run", "task": "task_run"}
        assert {r.setting.run for r in records} == {kinds[kind] for kind in measurement.kinds}, name
        for r in records:
            expected = scored.setting if r.setting.run == "task_run" else text.setting
            identity = dataclasses.replace(r.setting, scaling="none", factor=None, attention="full", logn=False,
                                           stride=None)
            assert identity == expected, name  # model, run, seed, trained length, variant, checkpoint, task
            if name != "theory":  # the model as trained, beside the settings
                assert r.setting.logn and r.setting.stride == (64 if r.setting.task is None else None), name
        for table in measurement.tables(results):
            assert table.rows and all(list(row)[:len(table.columns)] == list(table.columns)[:len(row)]
                                      for _, row in table.rows), name
        if name not in ("effective_length", "ruler_effective"):  # shown in the accuracy (RULER) table
            assert "| model |" in measurement.section(results), name
    # yarn at 256 is measured with its factor; at the training length every scaling gives the same numbers
    perplexity = {(r.setting.scaling, r.setting.attention, r.length): r for r in results.of(PerplexityRecord)}
    assert perplexity["yarn", "rerope", 256].setting.factor == 2.0 and perplexity["yarn", "rerope", 256].applicable
    assert perplexity["yarn", "full", 128].ppl == perplexity["none", "full", 128].ppl
    assert perplexity["yarn", "full", 256].ppl != perplexity["none", "full", 256].ppl
    passkey = results.of(PasskeyRecord)
    assert [(r.setting.scaling, r.setting.attention, r.length) for r in passkey] == \
        [(m, a, n) for m in ("none", "yarn") for a in ("full", "rerope") for n in (128, 256)]
    files = write_report(results, tmp_path)
    assert f"| {text_model.cfg.label} | 128 | yarn | rerope+logn | 1 |" in files["markdown"].read_text()
    assert Results.from_json(files["json"].read_text()) == results


def test_a_new_measurement_is_one_class_the_loop_and_the_report_pick_up(request, tmp_path):
    """A measurement registered from outside the package: measured at every setting of the plan through the loop,
    written to results.json (and read back), its own CSV file and its section of the report."""
    from dataclasses import dataclass

    from minillm.eval.measurement import Measurement, register_measurement
    from minillm.eval.records import Record, read_results

    @dataclass
    class WindowRecord(Record):
        length: int
        windows: int  # whole windows of `length` in the evaluation tokens

    class CountWindows(Measurement):
        record = WindowRecord
        csv = "windows.csv"

        def measure(self, reading):
            return [WindowRecord(reading.setting, reading.length, 200 // reading.length)]

        @classmethod
        def section(cls, results):
            return "## Windows\n\n" + " ".join(str(r.windows) for r in results.of(cls.record))

    register_measurement("windows")(CountWindows)
    request.addfinalizer(lambda: MEASUREMENTS.pop("windows"))
    model = tiny_model(context_length=16)
    subject = Subject(model, Setting("m", "m", 0, 16, "complex", "-"), None, [np.arange(201) % 64])
    config = EvalConfig(ckpt="-", lengths=[16, 32], scalings=["none", "linear"], passkey_trials=0, tail_loss=False)
    results = measure(subject, config)
    assert [(r.setting.scaling, r.length, r.windows) for r in results.of(WindowRecord)] == \
        [("none", 16, 12), ("none", 32, 6), ("linear", 16, 12), ("linear", 32, 6)]
    files = write_report(results, tmp_path)
    assert files["windows_csv"].read_text().splitlines()[0].endswith(",stride,length,windows")
    assert "## Windows\n\n12 6 12 6" in files["markdown"].read_text()
    assert read_results(tmp_path).of(WindowRecord) == results.of(WindowRecord)

    @dataclass
    class Clashing(Record):
        factor: float  # a Setting column: flat rows could not tell them apart

    with pytest.raises(ValueError, match=r"^measurements: clash: Clashing repeats the Setting's columns \['factor'\]"):
        register_measurement("clash")(type("Clash", (Measurement,), {"record": Clashing}))
    assert "clash" not in MEASUREMENTS


# ----------------------------------------------------------------------------------------------
# Accuracy of task-trained models


def task_model(task, context_length: int = 32, rope=None, seed: int = 0) -> Transformer:
    """A real (untrained) model over the task's vocabulary, as a run trained on it would be."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=task.vocab_size, context_length=context_length, d_model=16, n_layers=1, n_heads=2,
                      **({"rope": rope} if rope is not None else {}))
    return Transformer(cfg).eval()


def test_task_accuracy_equals_a_hand_count_on_planned_predictions(monkeypatch):
    """A model whose argmax is planned per example: wrong on both tokens of some answers, on the last token of
    others, right elsewhere; exact match, token accuracy and the loss are counted here by hand."""
    task = Needle()  # answers of 2 tokens, 4 per example
    inputs, targets, answers = validation_set(task, 64, 10, seed=5, split="test").tensors
    vocab, margin = task.vocab_size, 5.0
    plan = torch.where(targets == IGNORE, 0, targets)
    both_wrong = last_wrong = 0
    for k in range(len(inputs)):
        for j in range(4):
            where = (answers[k] == j).nonzero().flatten()
            assert len(where) == 2
            if (k + j) % 3 == 0:
                plan[k, where] = (plan[k, where] + 1) % vocab
                both_wrong += 1
            elif (k + j) % 4 == 1:
                plan[k, where[1]] = (plan[k, where[1]] + 1) % vocab
                last_wrong += 1
    lookup = {tuple(row.tolist()): row_plan for row, row_plan in zip(inputs, plan)}
    assert len(lookup) == len(inputs)
    model = task_model(task)
    seen = []

    def planned(x, attention=None, **_):
        seen.append(len(x))
        return margin * nn.functional.one_hot(torch.stack([lookup[tuple(row.tolist())] for row in x]), vocab).float()

    monkeypatch.setattr(model, "hidden_states", planned)
    model.head = nn.Identity()
    monkeypatch.setattr(tasks_module, "MAX_ATTENTION_PAIRS", 2 * 64**2)  # 2 examples per pass, whatever batch_size says
    score = task_accuracy(model, inputs, targets, answers, batch_size=3)
    assert seen == [2] * 5
    record = score.record(Setting("m", "r", 0, 32, "complex", task="needle"), 64)
    wrong_tokens = 2 * both_wrong + last_wrong
    assert (record.examples, record.answers, record.tokens) == (10, 40, 80)
    assert (both_wrong, last_wrong) == (14, 6) and record.exact_match == (40 - 14 - 6) / 40
    assert record.token_accuracy == (80 - wrong_tokens) / 80
    # Wilson at 20/40: 0.5 ± 1.96/(1 + 1.96²/40) · sqrt(0.25/40 + 1.96²/6400)
    assert (record.exact_match_low, record.exact_match_high) == pytest.approx((0.3520, 0.6480), abs=1e-4)
    assert record.exact_match_low < record.exact_match < record.exact_match_high
    assert record.token_accuracy_low < record.token_accuracy < record.token_accuracy_high
    right = math.log(math.exp(margin) + vocab - 1) - margin  # the target holds the boosted logit
    wrong = math.log(math.exp(margin) + vocab - 1)  # the target holds a logit of 0
    assert record.answer_loss == pytest.approx(((80 - wrong_tokens) * right + wrong_tokens * wrong) / 80, rel=1e-6)
    assert record.applicable and record.note is None and record.seconds >= 0


def test_task_accuracy_of_a_real_model_equals_its_full_logits():
    """Reading the head at the answers only gives what the whole logit matrix gives."""
    task = FlipFlop(p_read=0.3)
    model = task_model(task, context_length=32)
    with torch.no_grad():  # the argmax is a bit, 0 or 1 as the hidden state says: some answers right, some wrong
        model.head.weight[:FlipFlop.BIT] = 0
        model.head.weight[FlipFlop.BIT + 1] = -model.head.weight[FlipFlop.BIT]
    inputs, targets, answers = validation_set(task, 32, 12, seed=1, split="test").tensors
    with torch.inference_mode():
        logits = model(inputs)
    expected = accuracy(logits, targets, answers)
    score = task_accuracy(model, inputs, targets, answers, batch_size=5)
    assert score.counts == expected and expected.answers > 12 and 0 < expected.answers_correct < expected.answers
    assert score.answer_loss == pytest.approx(float(answer_loss(logits, targets)), rel=1e-5)
    # within the training length, sliding attention is full attention
    assert task_accuracy(model, inputs, targets, answers, attention="sliding").counts == expected


def accuracy_record(length: int, exact_match: float | None, *, trained: int = 64, run: str = "run", seed: int = 0,
                    method: str = "none", applicable: bool = True) -> AccuracyRecord:
    setting = Setting("complex θ=10000", run, seed, trained, "complex", task="mqar", scaling=method,
                      factor=length / trained if applicable else None)
    return AccuracyRecord(setting, length, examples=64, answers=256, tokens=256,
                          exact_match=exact_match if applicable else None, applicable=applicable,
                          note=None if applicable else "data.tasks.mqar.num_keys: too many pairs")


def test_effective_length_stops_at_the_first_dip():
    scores = {32: 1.0, 64: 0.9, 128: 0.85, 256: 0.6, 512: 0.95, 1024: 0.2}  # a dip at 256, a recovery at 512
    records = [accuracy_record(n, em) for n, em in scores.items()] + [accuracy_record(2048, None, applicable=False)]
    assert effective_length(records, 0.9) == 128  # bar 0.81: 256 fails, so 512 does not count
    assert effective_length(records, 0.5) == 512  # bar 0.45: 1024 fails
    assert effective_length(records, 0.2) == 1024  # not-applicable 2048 is not an evaluated length
    assert effective_length(records[::-1], 0.9) == 128  # the records' order does not matter
    # Below the training length every length counts too: a failure there leaves no effective length.
    assert effective_length([accuracy_record(32, 0.5), accuracy_record(64, 1.0)], 0.9) is None
    assert effective_length([accuracy_record(64, 0.0), accuracy_record(128, 0.0)], 0.9) is None  # nothing right
    assert effective_length([accuracy_record(128, 1.0)], 0.9) is None  # the training length not evaluated
    assert effective_length([accuracy_record(64, 0.5), accuracy_record(128, 0.45)], 0.9) == 128  # relative bar
    # A run that did not learn the task at 1x has no length to keep, however few answers its bar asks for.
    barely = [accuracy_record(64, 1 / 256), accuracy_record(128, 1 / 256), accuracy_record(256, 0.0)]
    assert effective_length(barely, 0.9) == 128
    assert effective_length(barely, 0.9, min_reference=0.5) is None
    assert effective_length([accuracy_record(64, 0.5), accuracy_record(128, 0.5)], 0.9, min_reference=0.5) == 128
    with pytest.raises(ValueError, match="effective_length: takes the records of one run"):
        effective_length([accuracy_record(64, 1.0), accuracy_record(64, 0.5, run="other")], 0.9)


def test_effective_lengths_one_per_run_and_setting():
    records = [accuracy_record(n, em, seed=seed, run=f"s{seed}", method=method)
               for seed in (0, 1) for method in ("none", "yarn")
               for n, em in ((64, 0.8), (128, 0.75 if method == "yarn" else 0.5), (256, 0.1))]
    found = {(e.setting.run, e.setting.scaling): e for e in effective_lengths(records, 0.9)}
    assert list(found) == [("s0", "none"), ("s0", "yarn"), ("s1", "none"), ("s1", "yarn")]
    assert found["s0", "none"].effective_length == 64 and found["s0", "yarn"].effective_length == 128
    assert found["s1", "yarn"] == EffectiveLengthRecord(Setting("complex θ=10000", "s1", 1, 64, "complex", task="mqar",
                                                                scaling="yarn"), 0.9, 0.8, 128, 256,
                                                        effective_low=64, effective_high=128, bar=0.9 * 0.8,
                                                        shortest_length=64, samples=256)  # 75% of 256: [69%, 80%]
    floor = {(e.setting.run, e.setting.scaling): e for e in effective_lengths(records, 0.9, min_reference=0.9)}
    assert all(e.effective_length is None and e.min_reference == 0.9 for e in floor.values())


def test_measure_accuracy_refuses_what_the_task_cannot_hold_and_reuses_equal_frequencies(monkeypatch):
    task = MQAR(num_keys=4, num_values=8, tokens_per_pair=16)  # 4 pairs at 64 tokens; 128 would need 8 keys
    model = task_model(task, context_length=32)
    subject = Subject(model, Setting(model.cfg.label, "mqar_run", 3, 32, "complex", "-", task="mqar"), task=task)
    calls = []
    score = task_accuracy
    monkeypatch.setattr(tasks_module, "task_accuracy", lambda m, x, *a, **k: calls.append(x.shape[1]) or score(m, x, *a, **k))
    config = EvalConfig(ckpt="-", lengths=[128, 8, 32, 64], scalings=["none", "linear"], task_examples=6)
    results = measure(subject, config)
    assert results.of(PerplexityRecord) == results.of(PasskeyRecord) == results.of(TailLossRecord) == []
    accuracy_records = results.of(AccuracyRecord)
    assert [(r.setting.scaling, r.length) for r in accuracy_records] == [(m, n) for m in ("none", "linear")
                                                                         for n in (8, 32, 64, 128)]
    assert sorted(calls) == [32, 64, 64]  # linear at 32 is factor 1: the none measurement again
    by_setting = {(r.setting.scaling, r.length): r for r in accuracy_records}
    for method in ("none", "linear"):
        short, long = by_setting[method, 8], by_setting[method, 128]
        assert not short.applicable and short.note.startswith("model.context_length: the mqar task needs sequences "
                                                              "of at least 16 tokens")
        assert not long.applicable and long.note.startswith("data.tasks.mqar.num_keys: mqar at length 128 holds 8 "
                                                            "pairs")
        assert long.exact_match is None and long.answer_loss is None and long.answers == 0
    assert by_setting["linear", 32].setting == dataclasses.replace(by_setting["none", 32].setting, scaling="linear")
    assert dataclasses.replace(by_setting["linear", 32], setting=by_setting["none", 32].setting) == \
        by_setting["none", 32]
    # the test stream, with the eval seed: the numbers a direct measurement gives
    direct = task_accuracy(model, *validation_set(task, 64, 6, seed=0, split="test").tensors)
    none_64 = by_setting["none", 64]
    assert (none_64.examples, none_64.answers, none_64.exact_match, none_64.token_accuracy, none_64.answer_loss) == \
        (6, direct.counts.answers, direct.counts.exact_match, direct.counts.token_accuracy, direct.answer_loss)
    assert none_64.answers == 6 * 4 and none_64.setting == Setting(model.cfg.label, "mqar_run", 3, 32, "complex", "-",
                                                                   task="mqar", factor=1.0)
    assert by_setting["linear", 64].setting.factor == 2.0 and by_setting["linear", 128].setting.factor is None
    scaled = task_accuracy(model, *validation_set(task, 64, 6, seed=0, split="test").tensors,
                           scaling=LinearScaling(factor=2.0, original_max_position=32))
    assert by_setting["linear", 64].answer_loss == scaled.answer_loss != direct.answer_loss
    assert [(e.setting.scaling, e.reference_exact_match, e.longest_length) for e in results.of(EffectiveLengthRecord)] \
        == [("none", by_setting["none", 32].exact_match, 64), ("linear", by_setting["linear", 32].exact_match, 64)]
    assert {t.length for t in results.of(TheoryRecord)} == {32, 64}  # the lengths measured


def test_measure_accuracy_past_learned_positions_does_not_apply():
    task = FlipFlop()
    model = task_model(task, context_length=16, rope=position_config("learned"))
    subject = Subject(model, Setting(model.cfg.label, "learned", 0, 16, "learned", "-", task="flipflop"), task=task)
    config = EvalConfig(ckpt="-", scalings=["none", "yarn"], task_examples=4)
    results = measure(subject, config)
    accuracy_records = results.of(AccuracyRecord)
    assert [(r.setting.scaling, r.length, r.applicable) for r in accuracy_records] == \
        [("none", 16, True)] + [("none", n, False) for n in (32, 64, 128, 256)]  # not rotary: no yarn
    assert all(r.note == "learned positions stop at 16" for r in accuracy_records[1:])
    assert [e.effective_length for e in results.of(EffectiveLengthRecord)] == \
        [16 if accuracy_records[0].exact_match >= config.effective_min_exact_match else None]
    assert results.of(TheoryRecord) == []


def test_task_settings_are_checked_naming_the_field():
    assert (EvalConfig(ckpt="-").task_examples, EvalConfig(ckpt="-").effective_threshold) == (64, 0.85)  # NoLiMa's
    assert EvalConfig(ckpt="-", effective_threshold=1.0).effective_threshold == 1.0
    with pytest.raises(ValueError, match="^task_examples: must be positive, got 0$"):
        EvalConfig(ckpt="-", task_examples=0)
    for threshold in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^effective_threshold: must lie in \(0, 1\]"):
            EvalConfig(ckpt="-", effective_threshold=threshold)
    assert EvalConfig(ckpt="-").effective_min_exact_match == 0.5
    for floor in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"^effective_min_exact_match: must lie in \[0, 1\]"):
            EvalConfig(ckpt="-", effective_min_exact_match=floor)


def save_run(folder: Path, model: Transformer, config: str) -> Path:
    """A run folder as training writes it: checkpoints/last.ckpt and config.yaml."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict()}}, folder / "checkpoints" / "last.ckpt")
    (folder / "config.yaml").write_text(textwrap.dedent(config))
    return folder


def test_a_sweep_of_text_and_task_runs_gets_each_its_own_measurement(tmp_path, monkeypatch):
    """minillm.eval.run.evaluate on a multirun folder holding a synthetic-task run and a text run: accuracy for the
    first, perplexity for the second, one report with both."""
    from omegaconf import OmegaConf

    from minillm.eval.run import evaluate

    task = MQAR(num_keys=8, num_values=8, tokens_per_pair=8)
    save_run(tmp_path / "sweep" / "0_task", task_model(task, context_length=16), """\
        seed: 2
        data:
          path: synthetic
          task: mqar
          tasks:
            mqar: {num_keys: 8, num_values: 8, tokens_per_pair: 8, power_a: 0.01, show_values: true}
            copy: {num_symbols: 32, reverse: false}
        logger: {group: null}
        """)
    text_model = tiny_model(context_length=16)
    text_run = save_run(tmp_path / "sweep" / "1_text", text_model, "seed: 0\ndata: {path: stdlib}\n")
    documents = [np.random.default_rng(0).integers(0, 64, 200)]
    # The text run's documents without a corpus: what trained_subject reads is its own concern.
    monkeypatch.setattr(loop_module, "trained_subject", lambda run, device: Subject(
        text_model, Setting(text_model.cfg.label, run.name, 0, 16, "complex", str(run.checkpoint)), None, documents))
    cfg = OmegaConf.structured(EvalConfig(ckpt=str(tmp_path / "sweep"), lengths=[16, 32, 64, 128], scalings=["none"],
                                          passkey_trials=0, task_examples=4, device="cpu",
                                          logger=LoggerConfig(kind="none")))
    files = evaluate(cfg, tmp_path / "eval")
    data = json.loads(files["json"].read_text())
    assert {r["run"] for r in data["perplexity"]} == {text_run.name}
    assert {r["run"] for r in data["accuracy"]} == {"0_task"} and len(data["accuracy"]) == 4
    by_length = {r["length"]: r for r in data["accuracy"]}
    assert [by_length[n]["applicable"] for n in (16, 32, 64, 128)] == [True, True, True, False]  # 16 pairs > 8 keys
    assert by_length[16]["answers"] == 4 * 2 and by_length[64]["answers"] == 4 * 8
    assert [e["run"] for e in data["effective_length"]] == ["0_task"]
    text = files["markdown"].read_text()
    assert "## Perplexity against evaluation length" in text and "## Task accuracy against evaluation length" in text
    assert files["accuracy_vs_length"].is_file() and files["ppl_vs_length"].is_file()


def test_a_glob_of_a_list_that_matches_nothing_is_skipped_unless_nothing_matches(tmp_path, caplog):
    """A study's ckpt list names every encoding; a partial sweep lacks some. One glob alone stays an error."""
    from minillm.runs import CheckpointError

    for name in ("0_rope-alibi__seed-0", "1_rope-complex__seed-0"):
        (tmp_path / "sweep" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "sweep" / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    present, absent = str(tmp_path / "sweep" / "*rope-alibi__*"), str(tmp_path / "sweep" / "*rope-xpos__*")
    with caplog.at_level("WARNING", logger="minillm"):
        runs = model_sources(EvalConfig(ckpt=[absent, present]))
    assert [run.name for run in runs] == ["0_rope-alibi__seed-0"]
    assert any(f"ckpt: nothing matches {absent}: skipped" in r.getMessage() for r in caplog.records)
    for ckpt in (absent, [absent], [absent, str(tmp_path / "sweep" / "*rope-t5__*")]):
        with pytest.raises(CheckpointError, match=r"ckpt: nothing matches .*\*rope-xpos__\*"):
            model_sources(EvalConfig(ckpt=ckpt))


def test_the_default_scalings_are_few_and_all_is_the_full_sweep():
    """A default evaluation reads none and yarn (minutes on 2 cores); scalings=all (or a single name) is one
    override away, all meaning every scaling a factor defines."""
    from minillm.eval.config import ALL_SCALINGS

    assert EvalConfig(ckpt="-").scalings == ["none", "yarn"]
    assert EvalConfig(ckpt="-", scalings="all").scalings == ALL_SCALINGS == \
        ["none", "linear", "ntk", "dynamic_ntk", "yarn", "dynamic_yarn", "llama3", "resonance"]
    assert EvalConfig(ckpt="-", scalings=["all"]).scalings == ALL_SCALINGS
    assert EvalConfig(ckpt="-", scalings="linear").scalings == ["linear"]
    for bad, message in [("lots", "scalings: got 'lots'"), ([], "scalings: name scalings"), (3, "scalings: name"),
                         (["longrope"], "scalings: longrope needs factors")]:
        with pytest.raises(ValueError, match=message):
            EvalConfig(ckpt="x.gguf", scalings=bad)


FLOAT_SETTINGS = ("scaling_factor", "effective_threshold", "effective_min_exact_match", "effective_absolute",
                  "longppl_alpha", "longppl_beta")


@pytest.mark.parametrize("name, value", [(n, v) for n in FLOAT_SETTINGS for v in (math.nan, math.inf, -math.inf)] +
                         [("passkey_depths", [0.5, math.nan]), ("passkey_depths", [math.inf])])
def test_every_float_setting_of_the_evaluation_refuses_nan_and_inf(name, value):
    floats = {f.name for f in dataclasses.fields(EvalConfig) if "float" in str(f.type)}
    assert floats == {*FLOAT_SETTINGS, "passkey_depths"}
    with pytest.raises(ValueError, match=f"^{name}: "):
        EvalConfig(ckpt="-", **{name: value})


def test_the_evaluation_says_how_many_cells_it_will_measure_before_it_starts():
    """One line from the models' configs alone (no weights loaded): models × scalings × attention × lengths, and
    each measurement's cells (tail loss from the training length up; passkey per depth; learned positions stop at
    their table)."""
    from types import SimpleNamespace

    from minillm.eval.loop import forecast

    text = SimpleNamespace(task=None)
    rotary, alibi = ModelConfig(context_length=64), ModelConfig(context_length=64, rope=position_config("alibi"))
    config = EvalConfig(ckpt="-")
    assert forecast([(text, rotary), (text, rotary)], config) == (
        "measuring 2 models × 2 scalings × 1 attention method × 5 lengths = 20 settings; cells: 20 perplexity, "
        "20 tail, 60 passkey; scalings=all measures every scaling")
    config = EvalConfig(ckpt="-", scalings="all", lengths=[32, 64, 128], passkey_trials=0, attention=["full", "sliding"])
    learned = ModelConfig(context_length=64, rope=position_config("learned"))
    assert forecast([(text, rotary), (text, alibi), (text, learned)], config) == (
        "measuring 3 models (8×2×3 + 1×2×3 + 1×2×3 scalings × attention × lengths) = 60 settings; cells: "
        "58 perplexity, 38 tail")
    task = SimpleNamespace(task=Needle())
    assert forecast([(task, rotary)], EvalConfig(ckpt="-", scalings="none", lengths=[64])) == \
        "measuring 1 model × 1 scaling × 1 attention method × 1 length = 1 setting; cells: 1 accuracy; " \
        "scalings=all measures every scaling"


def test_overwrite_replaces_only_an_evaluations_files(tmp_path):
    """overwrite=true never takes a run's files or a user's folders along with the old report."""
    from minillm.eval.run import check_results_folder
    from minillm.registry import ConfigError

    out = tmp_path / "eval"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("report.md", "results.json", "tokenizer.json"):
        (out / name).write_text("x")
    with pytest.raises(ConfigError, match=r"holds files that are not an evaluation's results \(checkpoints, "
                                          r"tokenizer.json\); overwrite=true replaces only an evaluation's"):
        check_results_folder(out, overwrite=True)
    (out / "checkpoints").rmdir()
    (out / "tokenizer.json").unlink()
    (out / "wandb").mkdir()
    check_results_folder(out, overwrite=True)  # an evaluation's own files: replaced


def test_all_scalings_is_given_alone():
    from minillm.eval.config import EvalConfig

    with pytest.raises(ValueError, match=r"^scalings: all is every scaling: give it alone, got \['all', 'longrope'\]"):
        EvalConfig(ckpt="run", scalings=["all", "longrope"])
