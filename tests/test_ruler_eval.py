"""RULER as an evaluation measurement: greedy decoding with the KV cache under every scaling and attention method
(against full forwards), the chat template, the measurement's records, tables and refusals, and the script end to
end."""

from __future__ import annotations

import _pydecimal
import csv
import inspect
import json
import json.decoder
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from tokenizers import processors

import minillm.eval.ruler as ruler_module
from minillm.data.ruler import RULER_TASKS, cached_ruler_samples, score
from minillm.data.tokens import eos_id, train_tokenizer
from minillm.eval.config import EvalConfig
from minillm.eval.loop import measure, outline
from minillm.eval.perplexity import scaling_for
from minillm.eval.records import Results, Setting
from minillm.eval.report import write_report
from minillm.eval.ruler import AVERAGE, Prompting, RulerEffectiveRecord, RulerMeasurement, RulerRecord, tokenizer_hash
from minillm.eval.sources import ChatTemplate, Subject, reply_format
from minillm.interop.pretrained import PretrainedSource
from test_eval_script import FAST, evaluate, quoted, read_csv, succeeded
from test_eval_script import tiny_runs  # noqa: F401  (the session's trained runs, shared with the script tests)
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.base import POSITION_ENCODINGS, position_config
from minillm.positions.methods import ATTENTION_METHODS, attention_method, check_encoding
from minillm.positions.rotary import RotaryConfig
from minillm.positions.scaling import SCALINGS, scaling_config

VOCAB = 61
TRAINED = 8  # prompts of 10 tokens and 14 new ones: decoding runs to 3x the training length


def tiny_model(rope, n_layers: int = 2, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, context_length=TRAINED, d_model=32, n_layers=n_layers, n_heads=4,
                      n_kv_heads=2, rope=rope, init_std=0.5, **overrides)  # wide logits: no near-ties in argmax
    return Transformer(cfg).eval()


def prompt(batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def greedy_by_full_forwards(model: Transformer, idx: torch.Tensor, steps: int, **read) -> torch.Tensor:
    """Greedy decoding without a cache: the whole growing sequence through hidden_states at every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model.head(model.hidden_states(idx, **read)[:, -1])
            idx = torch.cat((idx, logits.argmax(-1, keepdim=True)), dim=1)
    return idx


def evaluation_scaling(name: str, rotary_dim: int):
    """The scaling an evaluation at 3x the training length applies (longrope: made-up factors, one per frequency)."""
    if name != "longrope":
        return scaling_for(name, 3 * TRAINED, TRAINED, None)
    half = rotary_dim // 2
    return scaling_config({"type": "longrope", "factor": 3.0, "original_max_position": TRAINED,
                           "short_factor": [1.0 + i / half for i in range(half)],
                           "long_factor": [1.0 + 3 * i / half for i in range(half)]})


@pytest.mark.parametrize("method", sorted(ATTENTION_METHODS))
@pytest.mark.parametrize("scaling", sorted(SCALINGS))
def test_greedy_generate_with_a_cache_equals_full_forwards_for_every_scaling_and_method(scaling, method):
    """A rotary model serves every scaling and method. A dynamic scaling picks its frequencies from the current
    length, which the cached keys of deeper layers did not see (KVCache): one layer, where decoding is exact."""
    dynamic = SCALINGS[scaling].dynamic
    model = tiny_model(RotaryConfig("complex"), n_layers=1 if dynamic else 2)
    read = dict(scaling=evaluation_scaling(scaling, model.cfg.head_dim), attention=attention_method(method))
    idx = prompt()
    out = model.generate(idx, 14, temperature=0, **read)
    assert out.shape == (2, 24) and torch.equal(out[:, :10], idx)
    assert torch.equal(out, greedy_by_full_forwards(model, idx, 14, **read))
    assert len(set(out[:, 10:].flatten().tolist())) > 3  # a real continuation, not one repeated token


@pytest.mark.parametrize("encoding", sorted(POSITION_ENCODINGS))
def test_greedy_generate_with_log_n_equals_full_forwards_for_every_encoding(encoding):
    """Every encoding, queries scaled by log-n, under full attention and Self-Extend (two score sets) where it
    serves it (every method with a cache, every encoding: tests/test_attention.py); learned positions within
    their table (no forward runs after the last token). A method the encoding cannot serve is refused by name."""
    rope = position_config(encoding)
    model = tiny_model(rope)
    bounded = rope.max_position(TRAINED) is not None
    idx, steps = (prompt(seq=4), TRAINED - 4) if bounded else (prompt(), 10)
    for name in ("full", "self_extend"):
        method = attention_method(name)
        try:
            check_encoding(method, rope, TRAINED)
        except ValueError:
            with pytest.raises(ValueError, match=f"^attention: {name} "):  # before any step
                model.generate(idx, 2, temperature=0, attention=method)
            continue
        out = model.generate(idx, steps, temperature=0, attention=method, logn=True)
        assert torch.equal(out, greedy_by_full_forwards(model, idx, steps, attention=method, logn=True)), name


# ----------------------------------------------------------------------------------------------
# The measurement on a real tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token byte-level BPE trained on a few standard-library modules."""
    texts = [Path(module.__file__).read_text() for module in (inspect, _pydecimal, json.decoder)]
    return train_tokenizer(texts, 300, 2)


@pytest.fixture(scope="module")
def documents(tokenizer) -> list[np.ndarray]:
    """A held-out module as the model's one document: the essay haystacks' prose."""
    return [np.asarray(tokenizer.encode(Path(textwrap.__file__).read_text()).ids, dtype=np.int64)]


def text_subject(tokenizer, documents, trained: int, chat: ChatTemplate = None) -> Subject:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), context_length=trained, d_model=32,
                                    n_layers=1, n_heads=2, init_std=0.5)).eval()  # wide logits: varied output
    return Subject(model, Setting(model.cfg.label, "tiny", 0, trained, "complex", "-"), tokenizer, documents,
                   stop_token=eos_id(tokenizer), chat_template=chat)


def ruler_config(tmp_path, **settings) -> EvalConfig:
    settings = dict(dict(scalings=["none"], ruler_samples=2), **settings)
    config = EvalConfig(ckpt="tiny", passkey_trials=0, tail_loss=False, max_documents=1, **settings)
    config.data.cache_dir = str(tmp_path / "cache")
    return config


def test_scores_intervals_average_and_effective_length_of_an_oracle_that_fails_past_1024_tokens(
        tokenizer, documents, tmp_path, monkeypatch):
    """The scoring plumbing: a stub decoder (not a model: a tiny model learns no RULER task) that answers every
    prompt of at most 1100 tokens right and every longer one wrong. Each cell's score, Wilson interval (scipy's),
    the average over the tasks, the effective length at 85% of the average at the training length (512), the
    length whose prompt does not fit, the report's table, the CSV and results.json."""
    answers_of: dict[str, tuple[str, ...]] = {}

    def recording(*args, **kwargs):
        samples = cached_ruler_samples(*args, **kwargs)
        answers_of.update({s.input: s.answers for s in samples})
        return samples

    def oracle(model, prompt, max_new_tokens, stop_token, read):
        answers = answers_of[tokenizer.decode(prompt)]
        reply = ", ".join(answers) if len(prompt) <= 1100 else "I do not know"
        return tokenizer.encode(" " + reply + ".").ids[:max_new_tokens]

    monkeypatch.setattr(ruler_module, "cached_ruler_samples", recording)
    monkeypatch.setattr(ruler_module, "ruler_answer", oracle)
    config = ruler_config(tmp_path, lengths=[64, 512, 1024, 2048], ruler=["niah_single_1", "niah_single_2"])
    results = measure(text_subject(tokenizer, documents, 512), config)

    records = {(r.ruler_task, r.length): r for r in results.of(RulerRecord)}
    assert set(records) == {(t, n) for t in ("niah_single_1", "niah_single_2", AVERAGE)
                            for n in (64, 512, 1024, 2048)}
    for task in ("niah_single_1", "niah_single_2", AVERAGE):
        unfit = records[task, 64]
        assert not unfit.applicable and unfit.score is None and unfit.samples == 0
        assert ("does not fit in 64 tokens" if task != AVERAGE else "not every task was measured") in unfit.note
        for length in (512, 1024, 2048):
            r = records[task, length]
            right = length <= 1024  # RULER's prompts fill the budget: those of 2048 tokens exceed 1100
            assert r.applicable and r.score == (1.0 if right else 0.0)
            assert r.samples == (4 if task == AVERAGE else 2)
            wilson = binomtest(r.samples if right else 0, r.samples).proportion_ci(method="wilson")
            assert (r.score_low, r.score_high) == pytest.approx((wilson.low, wilson.high), abs=1e-4)  # z 1.96
            if task != AVERAGE:
                assert r.sample_scores == [r.score] * 2 and len(r.predictions) == 2
                assert length // 2 < r.prompt_tokens <= length - 128  # fitted: the answer's tokens left free
    [effective] = results.of(RulerEffectiveRecord)
    assert (effective.effective_length, effective.reference_score, effective.bar) == (1024, 1.0, pytest.approx(0.85))
    # 4 of 4 right: a Wilson lower bound of 0.51 misses the bar at once; 0 of 4: an upper bound of 0.49
    assert (effective.effective_low, effective.effective_high, effective.samples) == (None, 1024, 4)

    files = write_report(results, tmp_path / "out")
    report = files["markdown"].read_text()
    assert "## RULER against evaluation length" in report and "![ruler vs length](ruler_vs_length.png)" in report
    row = next(line for line in report.splitlines() if "| average |" in line)
    assert row.split(" | ")[-4:] == ["100% [51%–100%]", "100% [51%–100%]", "0% [0%–49%]", "1024 [<512–1024] |"]
    with open(files["ruler_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and "predictions" not in rows[0] and rows[0]["ruler_task"] == "niah_single_1"
    saved = json.loads(files["json"].read_text())
    assert len(saved["ruler"]) == 12 and saved["ruler_effective"][0]["effective_length"] == 1024
    read_back = {(r.ruler_task, r.length): r for r in Results.from_json(files["json"].read_text()).of(RulerRecord)}
    assert read_back == records


def test_each_setting_decodes_the_shared_samples_greedily_under_its_scaling_and_method(tokenizer, documents,
                                                                                        tmp_path):
    """A real tiny model: every record's predictions are the tokens Transformer.generate gives under the setting's
    scaling and attention method (greedy, KV cache, stop at EOS), decoded and scored by RULER's metric."""
    subject = text_subject(tokenizer, documents, 64)
    config = ruler_config(tmp_path, lengths=[512], ruler=["niah_single_1"], ruler_samples=1,
                          scalings=["none", "yarn"], attention=["full", "sliding"])
    results = measure(subject, config)
    [sample] = cached_ruler_samples("niah_single_1", 512, Prompting(tokenizer).count, [], 1, config.seed,
                                    cache_dir=tmp_path / "cache", tokenizer_hash=tokenizer_hash(tokenizer))
    records = results.of(RulerRecord)
    assert [(r.setting.scaling, r.setting.attention) for r in records] == [
        ("none", "full"), ("none", "sliding"), ("yarn", "full"), ("yarn", "sliding")]
    prompt = torch.tensor([tokenizer.encode(sample.input).ids])
    eos = eos_id(tokenizer)
    for r in records:
        read = dict(scaling=scaling_for(r.setting.scaling, 512, 64, None), attention=config.method(r.setting.attention))
        new = subject.model.generate(prompt, 128, temperature=0, stop_token=eos, **read)[0, prompt.shape[1]:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        assert r.predictions == [tokenizer.decode(new)] and r.new_tokens == len(new)
        assert r.sample_scores == [score(sample, r.predictions[0])] and r.prompt_tokens == sample.prompt_tokens
        assert r.setting.factor == (1.0 if r.setting.scaling == "none" else 8.0) and not r.chat
    assert len({tuple(r.predictions) for r in records}) > 1  # the settings read the model differently
    cells = RulerMeasurement.cells(outline(subject.model.cfg, config), 64, config)
    assert cells == 2 * 2 * 1 * 1  # scalings × methods × lengths × tasks: the forecast line's count


# Chat templates written for this test, each with a construct transformers' renderer supports (the first as
# SmolLM2-Instruct's: a default system turn).
TEMPLATES = {
    "system_default": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                      "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
                      "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "bos_and_checks": "{{ bos_token }}{% for message in messages %}"
                      "{% if message['role'] not in ['user', 'assistant'] %}"
                      "{{ raise_exception('roles must be user or assistant') }}{% endif %}\n"
                      "  [INST] {{ message['content'] | trim }} [/INST]\n{% endfor %}"
                      "{% if add_generation_prompt %}Answer:{% endif %}",
    "tojson_namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                        "{{ m | tojson }}{% endfor %}|{{ ns.n }}{{ eos_token }}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_template_renders_as_transformers_does(name, tokenizer):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|endoftext|>",
                                        chat_template=TEMPLATES[name])
    text = "Memorize this: ünïcode \"quoted\".\nWhat is it?"
    expected = reference.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    assert ChatTemplate(TEMPLATES[name], "<s>", "<|endoftext|>").render(text) == expected


def test_an_imported_tokenizers_template_and_eos_are_read_from_its_folder(tokenizer, tmp_path):
    """reply_format: what transformers' tokenizer keeps beside the tokenizer.json (the template, the EOS token that
    ends a reply); none for a tokenizer without a template."""
    from transformers import PreTrainedTokenizerFast

    for name, template in (("chat", TEMPLATES["system_default"]), ("plain", None)):
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                chat_template=template).save_pretrained(tmp_path / name)
        chat, stop = reply_format(PretrainedSource(str(tmp_path / name), gguf=False))
        assert stop == eos_id(tokenizer)
        assert chat == (ChatTemplate(template, None, "<|endoftext|>") if template else None)


def test_chat_prompts_go_through_the_template_without_the_tokenizers_own_special_tokens(tokenizer, documents,
                                                                                        tmp_path, monkeypatch):
    """ruler_chat=auto: the template wraps each prompt, the answer prefix after it, encoded as transformers'
    apply_chat_template encodes (no BOS of the post-processor: the template writes its own); never: completion
    prompts with the BOS; always, for a tokenizer without a template: refused by name."""
    with_bos = tokenizer.__class__.from_str(tokenizer.to_str())
    with_bos.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                            special_tokens=[("<|endoftext|>", eos_id(tokenizer))])
    template = ChatTemplate(TEMPLATES["system_default"], None, "<|endoftext|>")
    chat, completion = Prompting(with_bos, template.render), Prompting(with_bos)
    assert chat.encode("Hi") == tokenizer.encode("Hi").ids
    assert completion.encode("Hi") == [eos_id(tokenizer)] + tokenizer.encode("Hi").ids
    monkeypatch.setattr(ruler_module, "ruler_answer", lambda *args: [])  # only the prompts are looked at here
    subject = text_subject(with_bos, documents, 64, chat=template)
    for mode, chatted in (("auto", True), ("never", False)):
        measurement = RulerMeasurement(subject, outline(subject.model.cfg, ruler_config(tmp_path)),
                                       ruler_config(tmp_path, ruler=["niah_single_1"], ruler_chat=mode))
        [sample, _] = measurement.samples_at("niah_single_1", 1024)
        head = "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n" if chatted else ""
        assert sample.input.startswith(head + "A special magic number is hidden within the following text.")
        assert ("?<|im_end|>\n<|im_start|>assistant\n The special magic number for " in sample.input) == chatted
        assert sample.prompt_tokens == len((chat if chatted else completion).encode(sample.input))
    with pytest.raises(ValueError, match="^ruler_chat: always, but the tokenizer of tiny has no chat template"):
        plain = text_subject(tokenizer, documents, 64)
        RulerMeasurement(plain, outline(plain.model.cfg, ruler_config(tmp_path)),
                         ruler_config(tmp_path, ruler=["vt"], ruler_chat="always"))


def test_ruler_setting_takes_names_a_list_or_all_and_refuses_others_by_name():
    assert EvalConfig(ckpt="x", ruler="all").ruler == list(RULER_TASKS)
    assert EvalConfig(ckpt="x", ruler="vt").ruler == ["vt"]
    for bad, message in ((["nope"], "ruler: got 'nope', expected one of ['all', 'cwe'"),
                         (["all", "vt"], "ruler: all is every task: give it alone"),
                         (["vt", "vt"], "ruler: names a task twice"), (3, "ruler: name RULER tasks")):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            EvalConfig(ckpt="x", ruler=bad)


# ----------------------------------------------------------------------------------------------
# scripts/eval_extrapolate.py


@pytest.mark.slow
def test_script_measures_ruler_on_a_trained_run_and_says_where_a_prompt_does_not_fit(tiny_runs, tmp_path):
    """ruler=[niah_single_1,vt] on a tiny trained run: the forecast counts the cells, results.json holds a record
    per (task, length) and their average, a length too short for the prompts is a record saying so; ruler.csv,
    the report's section with the effective length and the plot."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['complex'])}", *FAST, "passkey_trials=0", "tail_loss=false",
                      "scalings=[none]", "lengths=[32,2048]", "ruler=[niah_single_1,vt]", "ruler_samples=1")
    succeeded(result)
    assert "cells: 2 perplexity, 4 ruler" in result.stdout + result.stderr
    saved = json.loads((out / "results.json").read_text())
    records = {(r["ruler_task"], r["length"]): r for r in saved["ruler"]}
    assert set(records) == {(t, n) for t in ("niah_single_1", "vt", "average") for n in (32, 2048)}
    for task in ("niah_single_1", "vt"):
        assert not records[task, 32]["applicable"] and "does not fit in 32 tokens" in records[task, 32]["note"]
        measured = records[task, 2048]
        assert measured["applicable"] and measured["samples"] == 1 and measured["prompt_tokens"] <= 2048
        assert measured["sample_scores"] == [measured["score"]] and len(measured["predictions"]) == 1
        assert measured["new_tokens"] <= {"niah_single_1": 128, "vt": 30}[task]
    assert records["average", 2048]["samples"] == 2
    [effective] = saved["ruler_effective"]
    assert effective["effective_length"] is None and effective["reference_score"] is None  # nothing fits at 32
    columns, rows = read_csv(out / "ruler.csv")
    assert columns[columns.index("ruler_task"):] == ["ruler_task", "length", "samples", "score", "score_low",
                                                     "score_high", "prompt_tokens", "new_tokens", "chat", "applicable",
                                                     "note", "seconds"] and len(rows) == 6
    report = (out / "report.md").read_text()
    assert "## RULER against evaluation length" in report and "| average | 2 | n/a |" in report
    assert (out / "ruler_vs_length.png").stat().st_size > 0


@pytest.mark.slow
def test_script_refuses_an_unknown_ruler_task_in_one_line(tmp_path):
    result = evaluate(tmp_path / "eval", "ckpt=any_run", "ruler=[niah_single_1,nope]")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: ruler: got 'nope', expected one of ['all', ")
    assert "Traceback" not in result.stderr and not (tmp_path / "eval" / "results.json").exists()
