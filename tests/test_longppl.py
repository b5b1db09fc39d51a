"""LongPPL (arXiv:2410.23771): the key tokens and LongPPL against the authors' `longppl` package on an exported tiny
Llama and against explicit per-token loops from the definition; the measurement, its evaluator and its table."""

from __future__ import annotations

import dataclasses
import inspect
import json.decoder
import math
from pathlib import Path

import pytest
import torch

from minillm.data.tokens import train_tokenizer
from minillm.eval.config import EvalConfig
from minillm.eval.longppl import (LongPPLMeasurement, LongPPLRecord, key_token_mask, key_tokens, load_evaluator,
                                  longppl, longppl_section, short_context_losses, window_losses)
from minillm.eval.measurement import Plan, Reading
from minillm.eval.perplexity import perplexity_at_length, scaling_for
from minillm.eval.records import Results, Setting
from minillm.eval.sources import Subject
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.methods import attention_method

from test_eval_script import FAST, SESSION_CACHE, evaluate, quoted, tiny_runs  # noqa: F401  (the session's runs)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([Path(inspect.__file__).read_text()], 300, 2)


def sharp_model(vocab_size: int, seed: int = 0, context_length: int = 16) -> Transformer:
    """Random weights large enough that attention is sharp, so that context changes the losses."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=32, n_layers=2,
                                    n_heads=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p)) if p.dim() == 1 else p.normal_(std=1.5 * p.shape[-1] ** -0.5)
    return model


def test_key_token_mask_edges():
    full = torch.tensor([1.0, 1.0, 3.0, 0.5, 0.5])
    short = torch.tensor([3.5, 3.0, 6.0, math.nan, 2.5])
    # gains 2.5, 2.0 (not > 2: strict), 3.0 but log p = −3 (not > −2), NaN (no short context), 2.0
    assert key_token_mask(full, short, 2.0, -2.0).tolist() == [True, False, False, False, False]
    assert key_token_mask(full, short, 1.9, -3.5).tolist() == [True, True, True, False, True]
    # log p = −1 is not above beta = −1 (strict); −0.5 is
    assert key_token_mask(full, short, 1.9, -1.0).tolist() == [False, False, False, False, True]
    assert not key_token_mask(full, short, 100.0, -100.0).any()


@pytest.mark.parametrize("alpha, beta", [(0.5, -6.0), (2.0, -2.0), (0.0, -100.0), (-100.0, -100.0)])
def test_longppl_equals_the_longppl_package(tokenizer, alpha, beta):
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("longppl.longppl")
    from minillm.interop.export import to_hf_llama

    model = sharp_model(tokenizer.get_vocab_size())
    length, short, step = 40, 8, 3
    text = Path(json.decoder.__file__).read_text()
    text = text[:tokenizer.encode(text).offsets[length][1]]  # one window of 40 targets: the package's text
    ids = torch.tensor([tokenizer.encode(text).ids])
    assert ids.shape == (1, length + 1)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    hf = to_hf_llama(model).eval()
    theirs = package.compute_longppl(text, hf, hf, fast, fast, trunc_len=short, sliding_window=step, alpha=alpha,
                                     beta=beta)
    key = key_tokens(model, ids, length, short=short, alpha=alpha, beta=beta, step=step)
    ours = longppl(*window_losses(model, ids, length), key)
    assert ours.ppl == pytest.approx(float(theirs["ppl"]), rel=1e-4)
    if theirs["longppl"] is None:  # (2, −2): the package finds none
        assert (ours.key_tokens, ours.longppl) == (0, None)
    else:
        assert ours.key_tokens == theirs["n_key_token"] and ours.longppl == pytest.approx(float(theirs["longppl"]),
                                                                                            rel=1e-4)
    if alpha == -100.0:  # every target but the first short − 1, which have no shorter context
        assert ours.key_tokens == length - (short - 1)


@torch.no_grad()
def explicit_short_losses(model: Transformer, chunk: torch.Tensor, short: int, step: int) -> list[float]:
    """From the definition: target t (token t of the chunk) read alone from its sub-window's start, one forward
    pass per target; the sub-windows start every `step` tokens and score the `step` tokens after `short`."""
    out = [math.nan] * (len(chunk) - 1)
    for start in range(0, len(chunk) - short, step):
        for t in range(start + short, min(start + short + step, len(chunk))):
            logits = model(chunk[None, start:t])[0, -1]
            out[t - 1] = float(torch.log_softmax(logits.double(), -1)[chunk[t]].neg())
    return out


@pytest.mark.parametrize("stride", [None, 12])
def test_key_tokens_in_every_window_equal_explicit_loops(stride):
    model = sharp_model(64, seed=1)
    tokens = torch.randint(64, (2, 49), generator=torch.Generator().manual_seed(3))
    length, short, step, alpha, beta = 24, 6, 4, 0.3, -8.0
    key = key_tokens(model, tokens, length, short=short, alpha=alpha, beta=beta, step=step, stride=stride)
    plan = [(b, b + length, 0) for b in range(0, 48 - length + 1, length)] if stride is None else \
        [(0, 24, 0), (12, 36, 12), (24, 48, 12)]  # perplexity's sliding plan: the last 12 targets of later windows
    expected = torch.zeros(2, 48, dtype=torch.bool)
    with torch.no_grad():
        for doc in range(2):
            for begin, end, scored_from in plan:
                chunk = tokens[doc, begin:end + 1]
                short_losses = explicit_short_losses(model, chunk, short, step)
                for j in range(scored_from, end - begin):  # target j predicts chunk[j + 1] from chunk[:j + 1]
                    full = float(torch.log_softmax(model(chunk[None, :j + 1])[0, -1].double(), -1)[chunk[j + 1]].neg())
                    expected[doc, begin + j] = short_losses[j] - full > alpha and -full > beta
    assert key.tolist() == expected.tolist() and 0 < int(key.sum()) < key.numel()
    # batched sub-windows equal the explicit ones
    batched = short_context_losses(model, tokens[:, :length + 1], short, step)
    assert batched[0].tolist() == pytest.approx(explicit_short_losses(model, tokens[0, :length + 1], short, step),
                                                abs=1e-4, nan_ok=True)
    # every target scored: window_losses' mean is perplexity_at_length's loss
    losses, scored = window_losses(model, tokens, length, stride=stride)
    assert float(losses[scored].mean()) == pytest.approx(perplexity_at_length(model, tokens, length,
                                                                               stride=stride).loss, rel=1e-5)


def subject_and_plan(tokenizer, lengths=(16, 32, 64)):
    model = sharp_model(tokenizer.get_vocab_size())
    documents = [tokenizer.encode(Path(m.__file__).read_text()).ids for m in (json.decoder, inspect)]
    import numpy as np

    subject = Subject(model, Setting("complex θ=10000", "run", 0, 16, "complex"), tokenizer,
                      [np.asarray(d[:200], dtype=np.int64) for d in documents])
    return subject, Plan(list(lengths), ["none", "yarn"], {"full": attention_method("full")}, {})


def readings(measurement, subject, length, attention="full"):
    for name in ("none", "yarn"):
        scaling = scaling_for(name, length, subject.setting.trained_length, None)
        setting = dataclasses.replace(subject.setting, scaling=name, factor=scaling.factor, attention=attention)
        yield measurement.measure(Reading(subject.model, setting, length, attention_method(attention), scaling))[0]


def test_measurement_scores_every_setting_on_the_key_tokens_of_the_evaluator(tokenizer, tmp_path):
    subject, plan = subject_and_plan(tokenizer)
    config = EvalConfig(ckpt="-", longppl=True, longppl_alpha=0.5, longppl_beta=-8.0, max_documents=2)
    assert LongPPLMeasurement.applies(subject, config) and not LongPPLMeasurement.applies(subject, EvalConfig(ckpt="-"))
    # the opening line's forecast: a cell per setting when on, none when off
    assert (LongPPLMeasurement.cells(plan, 16, config), LongPPLMeasurement.cells(plan, 16, EvalConfig(ckpt="-"))) == \
        (2 * 1 * 3, 0)
    measurement = LongPPLMeasurement(subject, plan, config)
    at_16 = list(readings(measurement, subject, 16))  # short = the training length: the window is short already
    assert all(r.key_tokens == 0 and r.longppl is None and "longppl_short=16" in r.note for r in at_16)
    none, yarn = readings(measurement, subject, 64)
    assert none.key_tokens == yarn.key_tokens > 0 and none.tokens == yarn.tokens == 2 * 64  # 2 documents' 64 targets
    assert none.key_share == none.key_tokens / none.tokens and none.longppl != yarn.longppl  # same tokens, two reads
    # the evaluator as trained picks them, whatever the reading: the key mask of the model itself at 64
    expected = key_tokens(subject.model, measurement.tokens, 64, short=16, alpha=0.5, beta=-8.0)
    assert int(expected.sum()) == none.key_tokens
    losses, scored = window_losses(subject.model, measurement.tokens, 64, scaling=scaling_for("yarn", 64, 16, None))
    assert yarn.longppl == pytest.approx(math.exp(float(losses[expected].mean())))
    assert yarn.ppl == pytest.approx(math.exp(float(losses[scored].mean())))
    refused = measurement.does_not_apply(none.setting, 128, "complex positions stop at 64")
    section = longppl_section(at_16 + [none, yarn] + refused)
    assert "nan" not in section.lower() and "arXiv:2410.23771" in section
    assert "| complex θ=10000 | 16 | none | full | 1 | n/a | " in section  # no key token at 16: n/a, not NaN
    back = Results.from_json(Results.of_records(at_16 + [none, yarn]).to_json()).of(LongPPLRecord)
    assert back == at_16 + [none, yarn]


def test_evaluator_from_a_folder_must_share_the_tokenizer(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minillm.interop.export import to_hf_llama

    subject, plan = subject_and_plan(tokenizer)
    other = sharp_model(tokenizer.get_vocab_size(), seed=5)
    folder = tmp_path / "evaluator"
    to_hf_llama(other).save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    config = EvalConfig(ckpt="-", longppl=True, longppl_alpha=0.5, longppl_beta=-8.0, max_documents=2,
                        longppl_evaluator=f"hf:{folder}")
    measurement = LongPPLMeasurement(subject, plan, config)
    record = next(readings(measurement, subject, 64))
    expected = key_tokens(other, measurement.tokens, 64, short=16, alpha=0.5, beta=-8.0)
    assert record.key_tokens == int(expected.sum()) and record.evaluator == f"hf:{folder}"
    another = train_tokenizer([Path(json.decoder.__file__).read_text()], 300, 2)
    with pytest.raises(ValueError, match=r"^longppl_evaluator: .* has another tokenizer"):
        load_evaluator(f"hf:{folder}", another, None, torch.device("cpu"))
    for missing in (f"hf:{tmp_path / 'nothing'}", str(tmp_path / "nothing")):  # named as the evaluator, not ckpt
        with pytest.raises(ValueError, match=rf"^longppl_evaluator: {tmp_path / 'nothing'} does not exist"):
            load_evaluator(missing, tokenizer, None, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# The study's correlation of LongPPL with effective length (minillm.eval.study)


def study_records(longppl_by_label: dict, effective_by_label: dict, length: int = 256):
    from minillm.eval.tasks import EffectiveLengthRecord

    judge = dict(evaluator="runs/long", short=64)  # one evaluator picked every run's key tokens, as the paper's
    texts = [LongPPLRecord(Setting(label, f"text_{i}", 0, 64, "v"), length, 5, 100, 0.05, value, 10.0,
                           note=None if value is not None else "no key token: none gains", **judge)
             for i, (label, value) in enumerate(longppl_by_label.items())]
    texts += [LongPPLRecord(Setting(label, f"text_{i}", 0, 64, "v", scaling="yarn"), length, 5, 100, 0.05, 1.0, 1.0,
                            **judge)
              for i, label in enumerate(longppl_by_label)]  # another scaling: not in the default correlation
    tasks = [EffectiveLengthRecord(Setting(label, f"task_{i}", 0, 64, "v", task="mqar"), 0.9, 0.9, value, 1024)
             for i, (label, value) in enumerate(effective_by_label.items())]
    return texts, tasks


def test_correlation_equals_scipy_with_ties_and_says_what_it_left_out(tmp_path):
    from scipy.stats import pearsonr, spearmanr

    from minillm.eval.study import correlation_table, longppl_correlation_report, longppl_effective_correlation

    longppl = {"alibi": 12.0, "complex θ=1e+04": 30.0, "fire": 9.5, "nope": 30.0, "t5": 14.0, "xpos": 200.0,
               "kerple": None, "learned": 50.0}
    effective = {"alibi": 512, "complex θ=1e+04": 128, "fire": 1024, "nope": 128, "t5": 256, "xpos": 64,
                 "kerple": 512, "learned": None, "only_task": 64}
    texts, tasks = study_records(longppl, effective)
    found = longppl_effective_correlation(texts, tasks, 256)
    used = ["alibi", "complex θ=1e+04", "fire", "nope", "t5", "xpos"]
    assert [label for label, _, _ in found.pairs] == used and found.n == 6
    x, y = [longppl[k] for k in used], [effective[k] for k in used]
    assert found.spearman == pytest.approx(spearmanr(x, y).statistic)  # ties on both sides: average ranks
    assert found.pearson == pytest.approx(pearsonr(x, y).statistic)
    assert found.left_out == {"kerple": "no key token: none gains", "learned": "no effective length (the task was "
                              "not learned)", "only_task": "no text run"}
    yarn = longppl_effective_correlation(texts, tasks, 256, scaling="yarn")
    assert yarn.n == 0 and (yarn.spearman, yarn.pearson) == (None, None)  # the task runs were read without yarn
    two = longppl_effective_correlation(*study_records({"a": 1.0, "b": 2.0}, {"a": 64, "b": 128}), 256)
    assert two.n == 2 and two.spearman is None and two.pearson is None  # two points: no correlation to state
    table = correlation_table([found, two])
    assert f"| 256 | 6 | {spearmanr(x, y).statistic:+.2f} | {pearsonr(x, y).statistic:+.2f} | kerple: " in table
    assert "| 256 | 2 | n/a | n/a | – |" in table and "| xpos | 256 | 200 | 64 |" in table
    with pytest.raises(ValueError, match=r"^study: a has 2 text runs"):
        doubled = study_records({"a": 1.0}, {"a": 64})[0]
        longppl_effective_correlation(doubled + [LongPPLRecord(Setting("a", "other", 1, 64, "v"), 256, longppl=2.0,
                                                               evaluator="runs/long", short=64)], tasks, 256)
    # Key tokens each run picked for itself, or by two evaluators, compare nothing: refused by name.
    own = [dataclasses.replace(r, evaluator="itself") for r in texts]
    with pytest.raises(ValueError, match=r"^longppl_evaluator: the study's text runs picked their own key tokens"):
        longppl_effective_correlation(own, tasks, 256)
    mixed = texts[:1] + [dataclasses.replace(r, evaluator="runs/other") for r in texts[1:]]
    with pytest.raises(ValueError, match=r"^longppl_evaluator: .* different key-token settings"):
        longppl_effective_correlation(mixed, tasks, 256)
    for name, records in (("text", texts), ("task", tasks)):  # two evaluations' folders, read back
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(Results.of_records(records).to_json())
    assert longppl_correlation_report(tmp_path / "text", tmp_path / "task") == correlation_table([found])


@pytest.mark.slow
def test_a_trained_run_read_with_another_run_as_its_evaluator(tiny_runs):  # noqa: F811 (the session's runs)
    from minillm.eval.loop import plan
    from minillm.eval.sources import trained_subject
    from minillm.runs import find_runs

    [run] = find_runs(tiny_runs["complex"], SESSION_CACHE[0])
    subject = trained_subject(run, torch.device("cpu"))
    config = EvalConfig(ckpt="-", longppl=True, longppl_evaluator=str(tiny_runs["alibi"]), longppl_short=8,
                        longppl_alpha=0.0, longppl_beta=-20.0, lengths=[32, 64], max_documents=1)
    measurement = LongPPLMeasurement(subject, plan(subject, config), config)
    assert measurement.evaluator.cfg.rope.variant == "alibi"  # the other run, with the same tokenizer
    record = next(readings(measurement, subject, 64))
    expected = key_tokens(measurement.evaluator, measurement.tokens, 64, short=8, alpha=0.0, beta=-20.0)
    assert record.key_tokens == int(expected.sum()) > 0 and record.evaluator == str(tiny_runs["alibi"])


@pytest.mark.slow
def test_the_script_reports_longppl_and_names_a_missing_evaluator(tiny_runs, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['complex'])}", *FAST, "lengths=[32,64]", "scalings=[none]",
                      "passkey_trials=0", "tail_loss=false", "longppl=true", "longppl_short=8", "longppl_alpha=0",
                      "longppl_beta=-30")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = {row["length"]: row for row in json.loads((out / "results.json").read_text())["longppl"]}
    assert set(rows) == {32, 64} and all(row["key_tokens"] > 0 and row["longppl"] > 0 for row in rows.values())
    assert rows[64]["tokens"] == 64 and rows[64]["evaluator"] == "itself" and rows[64]["short"] == 8
    assert "## LongPPL against evaluation length" in (out / "report.md").read_text()
    assert (out / "longppl.csv").read_text().count("\n") == 3  # header and two lengths
    assert (out / "longppl_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = evaluate(tmp_path / "missing", f"ckpt={quoted(tiny_runs['complex'])}", *FAST, "lengths=[64]",
                       "longppl=true", f"longppl_evaluator={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr[-3000:]
    assert missing.stderr.startswith(f"error: longppl_evaluator: {tmp_path / 'nothing'} does not exist")
