"""The lm-evaluation-harness model "minillm" (minillm.eval.harness): its scores against our own token losses,
perplexity windows and Transformer.generate; lm_eval's simple_evaluate over a local task and over RULER's tasks
that generate offline; its refusals; the command a user runs."""

from __future__ import annotations

import _pydecimal
import inspect
import json
import json.decoder
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import minillm.eval.harness as harness
from minillm.data.tokens import EOS_TOKEN, train_tokenizer
from minillm.eval.perplexity import perplexity_at_length, scaling_for
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.positions.methods import attention_method

REPO = Path(__file__).resolve().parents[1]
TRAINED = 64  # the tiny run's training length
RULER_TASKS = ["niah_single_1", "ruler_vt", "ruler_cwe", "ruler_fwe"]  # niah with the noise haystack: no essays
RULER_LENGTH = 2048  # lm_eval's vt and cwe generators fail below it with a 2048-token BPE (see the notes)
# the model's window past it: lm_eval's fwe sizes its text to the whole length, leaving no room for its 50 tokens
RULER_ROOM = 64


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A text run folder as training writes it (config.yaml, tokenizer.json, checkpoints/last.ckpt): a 2048-token
    byte-level BPE and a 2-layer rotary model trained for a few steps on standard-library source."""
    folder = tmp_path_factory.mktemp("harness_run")
    texts = [Path(module.__file__).read_text() for module in (inspect, _pydecimal, json.decoder, textwrap)]
    tokenizer = train_tokenizer(texts, 2048, 2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.get_vocab_size(), context_length=TRAINED, d_model=32,
                                    n_layers=2, n_heads=2))
    ids = torch.tensor(tokenizer.encode(texts[0]).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(12):
        starts = torch.randint(0, len(ids) - TRAINED - 1, (8,))
        batch = torch.stack([ids[s:s + TRAINED + 1] for s in starts])
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    (folder / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict()}}, folder / "checkpoints" / "last.ckpt")
    (folder / "config.yaml").write_text("seed: 0\n")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def lm(run) -> harness.MiniLLM:
    return harness.MiniLLM(ckpt=str(run), device="cpu", precision="float32", batch_size=3)


@pytest.fixture(scope="module")
def extended(run) -> harness.MiniLLM:
    """The run read at 4x its length under YaRN, Self-Extend and log-n."""
    return harness.MiniLLM(ckpt=str(run), scaling="yarn", factor=4, attention="self_extend", logn=True,
                           device="cpu", precision="float32", batch_size=2)


def reading(lm: harness.MiniLLM) -> dict:
    """How `lm` reads its model, built here from the evaluation's own functions."""
    config = lm.config
    return {"scaling": scaling_for(config.scaling, lm.max_length, TRAINED, config.factor),
            "attention": attention_method(config.attention), "logn": config.logn}


def own_loglikelihood(lm: harness.MiniLLM, context: str, continuation: str) -> tuple[float, bool]:
    """lm_eval's split of (context, continuation) into tokens (the context's trailing spaces go to the continuation),
    scored by Transformer.token_losses and the argmax of the model's full logits."""
    encode = lambda text: lm.tokenizer.encode(text).ids  # noqa: E731
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    if context:
        whole, context_ids = encode(context + continuation), encode(context)
    else:
        context_ids = [lm.tokenizer.token_to_id(EOS_TOKEN)]
        whole = context_ids + encode(continuation)
    n = len(whole) - len(context_ids)
    x, y = torch.tensor([whole[:-1]]), torch.tensor([whole[1:]])
    with torch.no_grad():
        losses = lm.model.token_losses(x, y, **reading(lm))[0]
        greedy = lm.model.head(lm.model.hidden_states(x, **reading(lm)))[0].argmax(-1)
    return -float(losses[-n:].sum()), bool((greedy[-n:] == y[0, -n:]).all())


def own_generation(lm: harness.MiniLLM, context: str, until: list[str], max_gen_toks: int) -> str:
    """Transformer.generate, greedy, decoded and cut before the first stop string."""
    ids = lm.tokenizer.encode(context).ids
    eos = lm.tokenizer.token_to_id(EOS_TOKEN)
    out = lm.model.generate(torch.tensor([ids]), max_gen_toks, temperature=0, stop_token=eos, **reading(lm))
    tokens = out[0, len(ids):].tolist()
    text = lm.tokenizer.decode(tokens[:tokens.index(eos)] if eos in tokens else tokens)
    for stop in until:
        text = text.split(stop)[0]
    return text


def greedy_text(lm: harness.MiniLLM, context: str, n: int) -> str:
    return own_generation(lm, context, [], n)


# ----------------------------------------------------------------------------------------------
# The three requests against our own computations


@pytest.mark.parametrize("which", ["lm", "extended"])
def test_loglikelihood_is_our_summed_token_losses_and_says_whether_greedy(which, request):
    lm = request.getfixturevalue(which)
    context = "def getsource(object):\n    return" * (1 if which == "lm" else 12)  # past 64 tokens: Self-Extend
    pairs = [(context, greedy_text(lm, context, 3)), (context, " zebra"), ("", "import os"),
             ("class Signature:", " pass"), ("x = 1", "\n")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    expected = [own_loglikelihood(lm, *pair) for pair in pairs]
    for (logprob, greedy), (own_logprob, own_greedy) in zip(results, expected):
        assert logprob == pytest.approx(own_logprob, rel=1e-5, abs=1e-5)
        assert greedy is own_greedy
    assert expected[0][1] and not expected[1][1]  # the greedy continuation is greedy, a zebra is not
    assert lm.loglikelihood([Instance("loglikelihood", {}, ("x = 1", ""), 0)], disable_tqdm=True) == [(0.0, True)]


def test_loglikelihood_rolling_is_minus_our_perplexity_windows_summed(lm, run):
    """lm_eval's rolling windows of max_length, the first after the end-of-text token, are perplexity_at_length's
    non-overlapping windows over [EOS] + the text's tokens; a last partial window is scored with a full window of
    context, its last targets only."""
    eos = lm.tokenizer.token_to_id(EOS_TOKEN)
    words = Path(textwrap.__file__).read_text().split(" ")
    texts = {}
    for count in range(40, len(words)):  # a text of whole windows, and one with 5 tokens over
        n = len(lm.tokenizer.encode(" ".join(words[:count])).ids)
        if n >= 3 * TRAINED and n % TRAINED in (0, 5):
            texts.setdefault(n % TRAINED, " ".join(words[:count]))
        if len(texts) == 2:
            break
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i)
                                        for i, text in enumerate(texts.values())], disable_tqdm=True)
    for (remainder, text), logprob in zip(texts.items(), rolling):
        tokens = torch.tensor([[eos] + lm.tokenizer.encode(text).ids])
        whole = perplexity_at_length(lm.model, tokens[:, :tokens.shape[1] - remainder], TRAINED)
        expected = -whole.loss * whole.tokens
        if remainder:
            with torch.no_grad():
                last = lm.model.token_losses(tokens[:, -TRAINED - 1:-1], tokens[:, -TRAINED:])[0]
            expected -= float(last[-remainder:].sum())
        assert whole.tokens + remainder == tokens.shape[1] - 1  # every token predicted once
        assert logprob == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("which", ["lm", "extended"])
def test_generate_until_is_transformer_generate_cut_at_the_stop_string(which, request):
    lm = request.getfixturevalue(which)
    prompts = ["class Parameter:\n", "def cleandoc(doc):\n", "class BlockFinder:\n"]
    full = [own_generation(lm, prompt, [], 20) for prompt in prompts]
    stops = [[text[4:6]] if len(text) > 6 else [] for text in full]  # a stop string the generation meets
    requests = [Instance("generate_until", {}, (prompt, {"until": stop, "max_gen_toks": 20}), i)
                for i, (prompt, stop) in enumerate(zip(prompts, stops))]
    requests.append(Instance("generate_until", {}, (prompts[0], {"until": [], "max_gen_toks": 7}), 3))
    generated = lm.generate_until(requests, disable_tqdm=True)
    assert generated[:3] == [own_generation(lm, p, stop, 20) for p, stop in zip(prompts, stops)]
    assert generated[3] == own_generation(lm, prompts[0], [], 7)
    assert any(len(cut) < len(text) for cut, text in zip(generated, full))  # a stop string did cut


# ChatML, as Qwen's and SmolLM2's tokenizers write it (a user's template: the test's own)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_an_imported_model_scores_as_its_token_losses_and_renders_its_chat_template(lm, tmp_path):
    """ckpt=hf:<folder>: its tokenizer's EOS ends generations, loglikelihood equals our token losses, and
    --apply_chat_template renders the turns as transformers does; a run's tokenizer has no template to apply."""
    from test_pretrained import family_config, random_hf, save_with_tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = save_with_tokenizer(random_hf(family_config("qwen2")), tmp_path / "tiny-qwen2")
    PreTrainedTokenizerFast(tokenizer_object=AutoTokenizer.from_pretrained(folder).backend_tokenizer,
                            eos_token="<|endoftext|>", chat_template=CHATML).save_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    imported = harness.MiniLLM(ckpt=f"hf:{folder}", device="cpu", precision="float32")
    assert imported.eot_token_id == reference.eos_token_id == imported.prefix_token_id  # no BOS: EOS before a text
    pairs = [("def f(x):", " return x + 1"), ("", "import os")]
    results = imported.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                     disable_tqdm=True)
    for (logprob, greedy), pair in zip(results, pairs):
        assert (logprob, greedy) == (pytest.approx(own_loglikelihood(imported, *pair)[0], rel=1e-5),
                                     own_loglikelihood(imported, *pair)[1])
    turns = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "3 + 3?"}]
    for prompt in (True, False):
        assert imported.apply_chat_template(turns, prompt) == reference.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=prompt)
    assert imported.chat_template(True) == CHATML
    with pytest.raises(ValueError, match=r"^apply_chat_template: the tokenizer of .* has no chat template"):
        lm.apply_chat_template(turns)


# ----------------------------------------------------------------------------------------------
# Through lm_eval: a local task, RULER's offline tasks


def write_local_tasks(folder: Path, lm: harness.MiniLLM) -> dict:
    """A multiple-choice task and a generate_until task over JSONL files in `folder`, half of whose answers are
    the model's own choices (from our computations), so that acc and exact_match are 0.5 exactly."""
    questions = ["def getfile(object):\n    ", "class ClosureVars:", "import ", "    return"]
    choices = [" pass", " return", " self", " import"]
    mc = []
    for i, question in enumerate(questions):
        scores = [own_loglikelihood(lm, question, choice)[0] for choice in choices]
        chosen = max(range(len(choices)), key=scores.__getitem__)
        mc.append({"question": question, "choices": choices, "answer": chosen if i % 2 == 0 else (chosen + 1) % 4})
    prompts = ["class Parameter:\n", "def unwrap(func):\n"]
    gen = [{"prompt": prompts[0], "target": own_generation(lm, prompts[0], ["\n\n"], 12)},
           {"prompt": prompts[1], "target": "not what it says"}]
    for name, rows in (("mc", mc), ("gen", gen)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "minillm_mc.yaml").write_text(textwrap.dedent(f"""\
        task: minillm_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        target_delimiter: ""
        metric_list:
          - metric: acc
        """))
    (folder / "minillm_gen.yaml").write_text(textwrap.dedent(f"""\
        task: minillm_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'gen.jsonl'}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{target}}}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return {"mc": mc, "gen": gen}


def test_a_local_task_through_simple_evaluate_scores_what_we_compute(lm, run, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # not the user's cache
    docs = write_local_tasks(tmp_path, lm)
    out = lm_eval.simple_evaluate(model="minillm", model_args={"ckpt": str(run), "device": "cpu",
                                                               "precision": "float32"},
                                  tasks=["minillm_mc", "minillm_gen"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert out["results"]["minillm_mc"]["acc,none"] == 0.5
    assert out["results"]["minillm_gen"]["exact_match,none"] == 0.5
    for sample in out["samples"]["minillm_mc"]:
        doc = sample["doc"]
        for (logprob, greedy), choice in zip(sample["filtered_resps"], doc["choices"]):
            assert float(logprob) == pytest.approx(own_loglikelihood(lm, doc["question"], choice)[0], rel=1e-5)
    generated = {s["doc"]["prompt"]: s["filtered_resps"][0] for s in out["samples"]["minillm_gen"]}
    assert generated == {doc["prompt"]: own_generation(lm, doc["prompt"], ["\n\n"], 12) for doc in docs["gen"]}


# ----------------------------------------------------------------------------------------------
# Refusals, and the command


@pytest.mark.parametrize("model_args, message", [
    ({"scaling": "bogus"}, r"^scaling: got 'bogus', expected one of \['dynamic_ntk', "),
    ({"scaling": "longrope"}, r"^scaling: longrope needs factors searched for .*: run scripts/longrope_search.py"),
    ({"attention": "sideways"}, r"^attention: got 'sideways', expected one of \['blockwise', "),
    ({"factor": -2}, r"^factor: must be a finite positive number, got -2"),
    ({"max_length": 0}, r"^max_length: must be a positive whole number, got 0"),
    ({"batch_size": "auto"}, r"^batch_size: must be a positive whole number, got 'auto'"),
    ({"pretrained": "gpt2"}, r"^model_args: got 'pretrained', expected one of \['attention', 'batch_size', "),
    ({"device": "tpu"}, r"^device: expected auto, cpu, cuda, cuda:<n> or mps, got 'tpu'"),
    ({"attention": "self_extend", "tokenizer": "{run}/config.yaml"}, r"config.yaml exists and holds no tokenizer.json"),
    ({"ckpt": "{run}/missing"}, r"^ckpt: .*missing does not exist"),
])
def test_a_refused_setting_is_one_value_error_naming_it(run, model_args, message):
    arguments = {"ckpt": str(run), "device": "cpu"} | {k: v.format(run=run) if isinstance(v, str) else v
                                                        for k, v in model_args.items()}
    with pytest.raises(ValueError, match=message):
        harness.MiniLLM(**arguments)


def test_a_learned_position_model_is_refused_past_its_positions(tmp_path, run):
    folder = tmp_path / "learned"
    (folder / "checkpoints").mkdir(parents=True)
    model = Transformer(ModelConfig(vocab_size=2048, context_length=TRAINED, d_model=16, n_layers=1, n_heads=2,
                                    rope={"variant": "learned"}))
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict()}}, folder / "checkpoints" / "last.ckpt")
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "tokenizer.json").write_text((run / "tokenizer.json").read_text())
    with pytest.raises(ValueError, match=r"^max_length: 128 is past learned positions, which stop at 64"):
        harness.MiniLLM(ckpt=str(folder), max_length=128, device="cpu")
    with pytest.raises(ValueError, match=r"^scaling: 'yarn' needs a rotary model"):
        harness.MiniLLM(ckpt=str(folder), scaling="yarn", device="cpu")


def test_without_lm_eval_the_command_names_the_extra(monkeypatch, capsys):
    for name in [name for name in sys.modules if name == "lm_eval" or name.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # an import of any of them raises ImportError
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(harness.__file__, run_name="__main__")
    assert exit_.value.code == 2
    extra = 'pip install -e ".[harness]"'
    assert capsys.readouterr().err == f"error: the lm-evaluation-harness adapter needs lm_eval: {extra}\n"


def test_the_command_says_a_refusal_in_one_line_and_reads_on_the_device_there_is(run, monkeypatch, capsys):
    """main() hands over to lm_eval's command line with --device auto unless one is given (lm_eval's default is
    cuda:0), and a refused setting raised inside it ends in one error line, exit 2."""
    import lm_eval.__main__

    seen = []

    def lm_eval_command_line():
        seen.append(sys.argv[1:])
        harness.MiniLLM(ckpt=str(run), scaling="bogus")  # what lm_eval constructs from --model_args

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lm_eval_command_line)
    monkeypatch.setattr(sys, "argv", ["harness"])
    arguments = ["--model", "minillm", "--model_args", f"ckpt={run},scaling=bogus", "--tasks", "minillm_mc"]
    with pytest.raises(SystemExit) as exit_:
        harness.main(arguments)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: scaling: got 'bogus', expected one of ['dynamic_ntk', ") and error.count("\n") == 1
    with pytest.raises(SystemExit):
        harness.main(arguments + ["--device", "cpu"])
    assert seen == [arguments + ["--device", "auto"], arguments + ["--device", "cpu"]]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # lm_eval would pass its --device beside it: a TypeError deep inside
        harness.main(["--model", "minillm", "--model_args", f"ckpt={run},device=cpu", "--tasks", "minillm_mc"])
    assert capsys.readouterr().err == "error: model_args: device is lm_eval's --device: give it as --device <value>\n"
    assert len(seen) == 2


@pytest.mark.slow
def test_the_command_a_user_runs_a_local_task_and_rulers_offline_tasks(run, lm, tmp_path):
    """python -m minillm.eval.harness --model minillm --model_args ckpt=...,tokenizer=<folder> --tasks ...: lm_eval's
    table with the local task's accuracy; RULER's tasks that need no download (niah with the noise haystack, vt,
    cwe, fwe) sized with the tokenizer folder the model writes, scored on what the model generates."""
    write_local_tasks(tmp_path, lm)
    folder = tmp_path / "hf_tokenizer"
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "minillm.eval.harness", "--model", "minillm", "--model_args",
               f"ckpt={run},precision=float32,max_length={RULER_LENGTH + RULER_ROOM},tokenizer={folder}",
               "--tasks", ",".join(["minillm_mc", *RULER_TASKS]), "--include_path", str(tmp_path),
               "--metadata", json.dumps({"max_seq_lengths": [RULER_LENGTH]}), "--limit", "1",
               "--log_samples", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [[cell.strip() for cell in line.split("|")] for line in done.stdout.splitlines() if line.startswith("|")]
    assert ["", "minillm_mc", "Yaml", "none", "0", "acc", "↑", "1", "±", "N/A", ""] in table  # its first answer is
    (results,) = (tmp_path / "out").rglob("results_*.json")  # the model's own choice
    scores = json.loads(results.read_text())["results"]

    from transformers import AutoTokenizer

    reader = harness.MiniLLM(ckpt=str(run), max_length=RULER_LENGTH + RULER_ROOM, device="cpu", precision="float32")
    text = "def f(x):\n    return x.get(1)"
    assert AutoTokenizer.from_pretrained(str(folder))(text).input_ids == reader.tokenizer.encode(text).ids
    for task in RULER_TASKS:
        (samples,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        (sample,) = [json.loads(line) for line in samples.read_text().splitlines()]
        context, settings = sample["arguments"]["gen_args_0"].values()  # the prompt, RULER's answer prefix included
        prompt_tokens = len(reader.tokenizer.encode(context).ids)
        assert prompt_tokens + settings["max_gen_toks"] <= reader.max_length, (task, prompt_tokens)  # nothing cut
        (response,) = sample["filtered_resps"]
        if task == "niah_single_1":  # the noise haystack: the generation itself, checked
            assert response == own_generation(reader, context, settings["until"], settings["max_gen_toks"])
        outputs = sample["doc"]["outputs"]
        score = sum(o.lower() in response.strip().lower() for o in outputs) / len(outputs)  # string_match_all
        assert scores[task][f"{RULER_LENGTH},none"] == pytest.approx(score)
