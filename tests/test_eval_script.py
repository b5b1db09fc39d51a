"""scripts/eval_extrapolate.py end to end (subprocess) on tiny checkpoints trained once per test session."""

from __future__ import annotations

import csv
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from minillm.cli import register_configs
from minillm.precision import eval_dtype
from minillm.eval.measurement import MEASUREMENTS
from minillm.eval.run import evaluate as run_evaluate

REPO = Path(__file__).resolve().parents[1]
TRAINED = 32  # the tiny models' context length: default eval lengths are 32 .. 512
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", f"model.context_length={TRAINED}",
        "data.batch_size=4", "trainer.max_steps=6", "trainer.val_check_interval=3", "data.val_windows=4",
        "tokenizer.vocab_size=300", "logger=csv"]
FAST = ["logger=csv", "max_documents=1", "buckets=4"]  # every eval below: one document, few position buckets
# The session's data cache, once tiny_runs has trained into it: evaluations cache the runs' documents there, as a
# user who trained with data.cache_dir=X evaluates with it (a run folder's own data.cache_dir is never read).
SESSION_CACHE: list[Path] = []
RESULT_COLUMNS = {"model", "run", "seed", "trained_length", "variant", "checkpoint", "method", "attention", "stride",
                  "factor", "applicable", "length", "loss", "ppl", "loss_beyond_train", "tokens", "seconds",
                  "peak_memory_mb"}
POSITION_COLUMNS = {"model", "run", "seed", "method", "attention", "length", "position_start", "position_end", "loss"}
SETTING_COLUMNS = ["model", "run", "seed", "trained_length", "variant", "checkpoint", "task", "method", "factor",
                   "attention", "logn", "stride"]
PASSKEY_COLUMNS = SETTING_COLUMNS + ["length", "depth", "trials", "exact_match", "key_logprob"]
SCALINGS = {"none", "linear", "ntk", "dynamic_ntk", "yarn", "dynamic_yarn", "llama3", "resonance"}


def script_env(home: Path) -> dict[str, str]:
    """Offline, one thread, a private HOME; no W&B credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """complex, alibi and learned runs from one `train.py -m` sweep: {variant: run folder, "multirun": sweep folder}.

    Trained once per session: xdist workers share the folder under a file lock.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = (tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()) / "tiny_runs"
    root.mkdir(exist_ok=True)
    sweep = root / "multirun"
    with FileLock(str(root / "train.lock")):
        if not (root / "done").exists():
            result = subprocess.run(
                [sys.executable, "scripts/train.py", "-m", *TINY, f"data.cache_dir={root / 'cache'}",
                 "rope=complex,alibi,learned", f"hydra.sweep.dir={sweep}"],
                cwd=REPO, env=script_env(root), capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
            (root / "done").touch()
    SESSION_CACHE[:] = [root / "cache"]
    runs = {str(OmegaConf.load(folder / "config.yaml").rope.variant): folder
            for folder in sorted(sweep.iterdir()) if (folder / "config.yaml").is_file()}
    assert set(runs) == {"complex", "alibi", "learned"}, runs
    return {**runs, "multirun": sweep}


def quoted(*paths: Path) -> str:
    """A Hydra override value: sweep folders are named like 0_rope=alibi,tokenizer.vocab_size=300, so quote them."""
    items = [f"'{path}'" for path in paths]
    return items[0] if len(items) == 1 else f"[{','.join(items)}]"


def session_cache() -> list[str]:
    return [f"data.cache_dir={path}" for path in SESSION_CACHE]


def evaluate(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/eval_extrapolate.py", f"hydra.run.dir={out}", *session_cache(),
                           *overrides],
                          cwd=REPO, env=script_env(out.parent), capture_output=True, text=True, timeout=600)


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow
def test_multirun_folder_default_lengths(tiny_runs, tmp_path):
    """One table for every run of a sweep: each scaling for the rotary model, none for ALiBi, n/a for
    learned positions past their table; every output file with its columns."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['multirun'])}", *FAST, "passkey_trials=0", "scalings=all")
    succeeded(result)
    # said before measuring: learned positions stop at their table, the tail loss starts at the training length
    assert "measuring 3 models (8×1×5 + 1×1×5 + 1×1×5 scalings × attention × lengths) = 50 settings; cells: " \
           "46 perplexity, 46 tail\n" in result.stdout + result.stderr

    columns, rows = read_csv(out / "results.csv")
    assert RESULT_COLUMNS <= set(columns)
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], []).append(row)
    assert set(by_variant) == {"complex", "alibi", "learned"}
    default_lengths = {TRAINED * m for m in (1, 2, 4, 8, 16)}
    for variant, group in by_variant.items():
        assert {int(r["length"]) for r in group} == default_lengths, variant

    complex_rows = by_variant["complex"]
    assert {(r["method"], int(r["length"])) for r in complex_rows} == \
           {(m, n) for m in SCALINGS for n in default_lengths}
    assert len(complex_rows) == len(SCALINGS) * len(default_lengths)
    factor = {(r["method"], int(r["length"])): float(r["factor"]) for r in complex_rows}
    assert factor["linear", 512] == 16.0 and factor["yarn", 128] == 4.0 and factor["linear", 32] == 1.0
    assert factor["dynamic_ntk", 512] == 1.0  # its base follows the length already
    assert {r["method"] for r in by_variant["alibi"]} == {"none"}
    for row in complex_rows + by_variant["alibi"]:
        assert row["applicable"] == "True" and float(row["ppl"]) > 1
        assert float(row["seconds"]) >= 0 and float(row["peak_memory_mb"]) > 0
    # The same targets at every length: the first 512 of one document.
    assert {int(r["tokens"]) for r in complex_rows + by_variant["alibi"]} == {512}
    assert all(r["loss_beyond_train"] == "" for r in complex_rows if int(r["length"]) == TRAINED)
    assert all(float(r["loss_beyond_train"]) > 0 for r in complex_rows if int(r["length"]) > TRAINED)

    learned = {int(r["length"]): r for r in by_variant["learned"]}
    assert learned[TRAINED]["applicable"] == "True" and float(learned[TRAINED]["ppl"]) > 1
    for length in default_lengths - {TRAINED}:
        assert learned[length]["applicable"] == "False" and learned[length]["ppl"] == ""
        assert "learned positions stop at 32" in learned[length]["note"]

    report = (out / "report.md").read_text()
    dtype, why = eval_dtype("auto", torch.device("cpu"))  # this machine's processor decides
    assert f"precision: {str(dtype).removeprefix('torch.')} ({why})" in report
    assert json.loads((out / "results.json").read_text())["precision_reason"] == why
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| alibi |") for line in table)
    assert sum(line.startswith("| complex θ=10000 |") for line in table) >= len(SCALINGS)
    learned_line = next(line for line in table if line.startswith("| learned |"))
    assert learned_line.count("n/a") == 4

    data = json.loads((out / "results.json").read_text())
    assert set(data) == {*MEASUREMENTS, "precision", "precision_reason"} >= \
        {"perplexity", "passkey", "theory", "tail", "accuracy", "effective_length", "longppl"}
    assert data["longppl"] == []  # longppl=false by default
    assert len(data["perplexity"]) == len(rows) and data["passkey"] == []
    complex_tail = [t for t in data["tail"] if t["run"] == tiny_runs["complex"].name]
    assert {(t["method"], t["length"]) for t in complex_tail} == {(m, n) for m in SCALINGS for n in default_lengths}
    assert {t["targets"] for t in data["tail"]} == {TRAINED}  # the same last L targets at every context length
    assert {t["length"] for t in data["tail"] if t["model"] == "learned"} == {TRAINED}  # its table stops there
    assert {t["length"] for t in data["theory"]} == default_lengths
    assert {t["run"] for t in data["theory"]} == {tiny_runs["complex"].name}  # rotary models only
    assert all(len(r["by_position"]) <= 4 for r in data["perplexity"])

    position_columns, position_rows = read_csv(out / "loss_by_position.csv")
    assert POSITION_COLUMNS <= set(position_columns) and position_rows
    passkey_columns, passkey_rows = read_csv(out / "passkey.csv")
    assert passkey_columns == PASSKEY_COLUMNS and passkey_rows == []
    for image in ("ppl_vs_length.png", "loss_vs_position.png"):
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_checkpoint_list_attention_stride_and_passkey(tiny_runs, tmp_path):
    """ckpt=[a,b] gives one table; every attention pattern with a stride; ten passkey trials per length/depth under
    each scaling and attention pattern."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['complex'], tiny_runs['alibi'])}", *FAST, "lengths=[128,256]",
                      "scalings=[none,yarn]", "attention=[full,blockwise,sliding]", "stride=16",
                      "passkey_trials=10", "passkey_depths=[0.5]")
    succeeded(result)
    assert "scalings ['yarn'] skipped for" in result.stdout + result.stderr  # ALiBi has no rotary frequencies
    _, rows = read_csv(out / "results.csv")
    combos = {(r["variant"], r["method"], r["attention"], int(r["length"])) for r in rows}
    attention = {"full", "blockwise", "sliding"}
    assert combos == {("complex", m, a, n) for m in ("none", "yarn") for a in attention for n in (128, 256)} | \
                     {("alibi", "none", a, n) for a in attention for n in (128, 256)}
    assert {r["stride"] for r in rows} == {"16"}
    assert {int(r["tokens"]) for r in rows} == {256}  # a stride scores every target once
    ppl = {(r["variant"], r["method"], r["attention"], int(r["length"])): float(r["ppl"]) for r in rows}
    assert ppl["complex", "none", "sliding", 256] != ppl["complex", "none", "full", 256]

    report = (out / "report.md").read_text()
    assert "| complex θ=10000 |" in report and "| alibi |" in report and "## Passkey retrieval" in report
    columns, passkey = read_csv(out / "passkey.csv")
    assert columns == PASSKEY_COLUMNS
    assert {(r["model"], r["method"], r["attention"], int(r["length"])) for r in passkey} == \
           {("complex θ=10000", m, a, n) for m in ("none", "yarn") for a in attention for n in (128, 256)} | \
           {("alibi", "none", a, n) for a in attention for n in (128, 256)}
    for row in passkey:
        assert int(row["trials"]) == 10 and float(row["depth"]) == 0.5
        assert 0 <= float(row["exact_match"]) <= 1 and float(row["key_logprob"]) <= 0


@pytest.mark.slow
def test_training_free_methods_with_their_knobs_skip_what_an_encoding_cannot_serve(tiny_runs, tmp_path):
    """attention=[...] with methods.<name>.<knob>: every run gets a row per method, n/a (with the reason) where its
    encoding cannot serve it; the tail loss (ReRoPE's protocol) comes along; logn is a column of its own, and the
    report's attention label."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['multirun'])}", *FAST, "lengths=[32,128]", "scalings=[none]",
                      "attention=[full,self_extend,rerope]", "methods.self_extend.group=4", "logn=true",
                      "passkey_trials=0")
    succeeded(result)
    _, rows = read_csv(out / "results.csv")
    got = {(r["variant"], r["attention"]): r for r in rows if r["length"] == "128"}
    assert set(got) == {(v, a) for v in ("complex", "alibi", "learned") for a in ("full", "self_extend", "rerope")}
    assert {r["logn"] for r in rows} == {"True"}
    assert got["alibi", "rerope"]["applicable"] == "False"
    assert "rerope turns rotary positions" in got["alibi", "rerope"]["note"]
    assert got["learned", "self_extend"]["applicable"] == "False"  # positions added to the tokens
    assert got["complex", "self_extend"]["applicable"] == "True"
    assert float(got["complex", "self_extend"]["ppl"]) != float(got["complex", "full"]["ppl"])
    assert "attention rerope skipped for" in result.stdout + result.stderr
    _, tail = read_csv(out / "tail_loss.csv")
    assert {(r["model"], r["attention"], r["logn"], int(r["length"]), int(r["targets"])) for r in tail
            if r["model"] == "alibi"} == {("alibi", a, "True", n, TRAINED) for a in ("full", "self_extend") for n in (32, 128)}
    report = (out / "report.md").read_text()
    assert "## Loss on the last 32 tokens against the context read" in report
    assert "| alibi | 32 | none | self_extend+logn | 1 |" in report  # the tables' label, from the setting


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["attention=[rerope]"], "attention: rerope turns rotary positions; rope.variant='alibi' is not rotary"),
    (["attention=[self_extend]", "methods.self_extend.window=32"], "methods.self_extend.window: must lie in [1, 32)"),
    (["attention=[self_extend]", "methods.self_extend.group=0"], "methods.self_extend.group: must be at least 1"),
    (["attention=[self_extend]", "methods.self_extend.grop=2"], "Key 'grop' not in 'SelfExtend'"),  # Hydra's own
    (["attention=[dilated]"], "attention: got 'dilated'"),
    (["precision=fp8"], "precision: got 'fp8'"),
])
def test_bad_attention_settings_exit_naming_them(overrides, message, tiny_runs, tmp_path):
    """Exit 2 with our one line; an unknown knob is Hydra's own refusal, one line too (the key named)."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['alibi'])}", *FAST, "lengths=[64]", *overrides)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert not (out / "results.csv").exists()


@pytest.mark.slow
def test_passkey_too_short_is_skipped(tiny_runs, tmp_path):
    """The prompt takes about 90 tokens with a 300-token vocabulary: at 32 and 64, skipped with a warning."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['complex'])}", *FAST, "scalings=[none]", "passkey_trials=1",
                      "passkey_depths=[0.5]")
    succeeded(result)
    assert "passkey at length 32 skipped" in result.stdout + result.stderr
    _, passkey = read_csv(out / "passkey.csv")
    assert {int(r["length"]) for r in passkey} == {128, 256, 512}


def compose_eval(*overrides: str) -> DictConfig:
    """The eval script's configuration, composed in-process (the script's error handling is tested by subprocess)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("eval", overrides=[*session_cache(), *overrides])


@pytest.mark.slow
def test_length_past_longest_document_is_skipped(tiny_runs, tmp_path):
    """A length no validation document reaches is skipped with a warning; with none left, the run is refused."""
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['alibi'])}", *FAST, "lengths=[64,10000000]", "passkey_trials=0")
    succeeded(result)
    assert "length 10000000 skipped" in result.stdout + result.stderr
    _, rows = read_csv(out / "results.csv")
    assert {int(r["length"]) for r in rows} == {64}

    cfg = compose_eval(f"ckpt={quoted(tiny_runs['alibi'])}", *FAST, "lengths=[10000000]", "passkey_trials=0")
    with pytest.raises(ValueError, match=r"lengths: none of \[10000000\] fits the documents") as error:
        run_evaluate(cfg, tmp_path / "none_left")
    longest = int(re.search(r"longest: (\d+) tokens", str(error.value)).group(1))
    assert longest > 64  # the real longest document, not those past the shortest length asked for


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "corrupt", "zero_length"])
def test_script_refuses_bad_input_with_a_message(case, tiny_runs, tmp_path):
    """Exit status 2, the reason on stderr naming the file or setting, no traceback, no results."""
    ckpt, extra, message = {
        "missing": (tmp_path / "no_such_run", [], f"error: ckpt: {tmp_path / 'no_such_run'} does not exist"),
        "corrupt": (tmp_path / "corrupt.ckpt", [],
                    f"error: checkpoint {tmp_path / 'corrupt.ckpt'} is corrupt, truncated"),
        "zero_length": (tiny_runs["complex"], ["lengths=[0]"], "error: lengths: must be positive token counts"),
    }[case]
    if case == "corrupt":
        data = (tiny_runs["complex"] / "checkpoints" / "last.ckpt").read_bytes()
        ckpt.write_bytes(data[: len(data) // 3])
    result = evaluate(tmp_path / "eval", f"ckpt={quoted(ckpt)}", *FAST, *extra)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "eval" / "results.csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["foreign", "bare_checkpoint", "empty_folder", "negative_length"])
def test_evaluate_refuses_bad_input(case, tiny_runs, tmp_path):
    """ValueError subclasses (the script turns them into exit status 2) whose message names the problem."""
    real = tiny_runs["complex"] / "checkpoints" / "last.ckpt"
    if case == "foreign":  # a torch file, but not one of ours
        torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.ckpt")
    elif case == "bare_checkpoint":  # a real checkpoint copied out of its run folder
        (tmp_path / "last.ckpt").write_bytes(real.read_bytes())
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
    ckpt, extra, message = {
        "foreign": (tmp_path / "foreign.ckpt", [],
                    f"checkpoint {tmp_path / 'foreign.ckpt'} was not written by minillm"),
        "bare_checkpoint": (tmp_path / "last.ckpt", [], f"ckpt: {tmp_path} lacks config.yaml or tokenizer.json"),
        "empty_folder": (tmp_path / "empty", [],
                         f"no checkpoints/best.ckpt or checkpoints/last.ckpt in {tmp_path / 'empty'}"),
        "negative_length": (tiny_runs["complex"], ["lengths=[64,-1]"], "lengths: must be positive token counts"),
    }[case]
    cfg = compose_eval(f"ckpt={quoted(ckpt)}", *FAST, *extra)
    with pytest.raises(ValueError) as error:
        run_evaluate(cfg, tmp_path / "eval")
    assert message in str(error.value)
    assert not (tmp_path / "eval" / "results.csv").exists()


@pytest.mark.slow
def test_wandb_offline_run_in_output_folder(tiny_runs, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt={quoted(tiny_runs['complex'])}", "logger=wandb", "logger.mode=offline",
                      "max_documents=1", "buckets=4", "lengths=[64]", "scalings=[none,linear]", "passkey_trials=0")
    succeeded(result)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb folder"
    assert list(runs[0].glob("run-*.wandb"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_device_without_one_is_named(tmp_path):
    cfg = compose_eval("ckpt=outputs/train/x", "device=cuda", "logger=none")
    with pytest.raises(ValueError, match=r"^device='cuda': torch .* sees no cuda device here; use device=cpu"):
        run_evaluate(cfg, tmp_path / "eval")


# ----------------------------------------------------------------------------------------------
# Imported models (minillm.pretrained): ckpt=hf:<folder> beside a trained run


@pytest.fixture
def hf_folder(tmp_path):
    pytest.importorskip("transformers")
    from test_pretrained import family_config, random_hf, save_with_tokenizer

    hf = random_hf(family_config("qwen2"))
    return save_with_tokenizer(hf, tmp_path / "tiny-qwen2"), hf


@pytest.mark.slow
def test_imported_model_is_measured_on_the_given_text_beside_a_trained_run(hf_folder, tiny_runs, tmp_path):
    """ckpt=[hf:<folder>, <run>] data.path=<file>: the imported model reads the file through its own tokenizer,
    at 1x = its max_position_embeddings; its perplexity equals transformers' own, computed here."""
    import argparse

    import transformers

    folder, hf = hf_folder
    text = Path(argparse.__file__).read_text()[:6000]
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt=[{quoted(Path('hf:' + str(folder)))},{quoted(tiny_runs['complex'])}]", *FAST,
                      f"data.path={tmp_path / 'text.txt'}", "lengths=[32,64]", "scalings=[none,yarn]",
                      "passkey_trials=0", "precision=float32")  # transformers' own computation is float32
    succeeded(result)
    _, rows = read_csv(out / "results.csv")
    imported = {(r["method"], int(r["length"])): r for r in rows if r["run"] == "tiny-qwen2"}
    assert set(imported) == {(m, n) for m in ("none", "yarn") for n in (32, 64)}
    assert {r["trained_length"] for r in imported.values()} == {"32"}
    assert any(r["run"] != "tiny-qwen2" for r in rows)  # the trained run is in the same table

    ids = transformers.AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False)
    tokens = torch.tensor(ids[:65])
    with torch.no_grad():  # non-overlapping windows of 32 over the first 64 targets
        losses = [torch.nn.functional.cross_entropy(hf(tokens[None, start:start + 32]).logits[0],
                                                    tokens[start + 1:start + 33]) for start in (0, 32)]
    assert float(imported["none", 32]["ppl"]) == pytest.approx(float(torch.stack(losses).mean().exp()), rel=1e-4)


@pytest.mark.parametrize("case", ["missing", "no_config", "truncated", "unsupported"])
def test_bad_imports_exit_naming_the_file_or_field(case, hf_folder, tmp_path):
    folder, _ = hf_folder
    weights = folder / "model.safetensors"
    ckpt, message = {
        "missing": (f"hf:{tmp_path / 'absent'}", f"error: ckpt: {tmp_path / 'absent'} does not exist"),
        "no_config": (f"hf:{tmp_path}", f"error: ckpt: {tmp_path} has no config.json"),
        "truncated": (f"hf:{folder}", f"error: ckpt: {weights} is truncated"),
        "unsupported": (f"hf:{folder}", "model_type='gpt2' is not supported"),
    }[case]
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    if case == "unsupported":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "eval"
    result = evaluate(out, f"ckpt='{ckpt}'", *FAST, "passkey_trials=0")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_synthetic_task_run_is_scored_by_accuracy_at_every_length(synthetic_run, tmp_path):
    """A copy-task run: exact match at 1x as high as it trained to, every length up to 16x measured (the copy
    grows with the length), the report's accuracy table and plot, and no perplexity for a run without text."""
    out = tmp_path / "eval"
    succeeded(evaluate(out, f"ckpt={quoted(synthetic_run)}", "logger=csv", "scalings=[none,yarn]", "task_examples=32"))
    columns, rows = read_csv(out / "accuracy.csv")
    assert {"task", "length", "exact_match", "exact_match_low", "exact_match_high", "token_accuracy"} <= set(columns)
    assert {(r["method"], int(r["length"])) for r in rows} == {(m, n) for m in ("none", "yarn")
                                                             for n in (16, 32, 64, 128, 256)}
    at_1x = {r["method"]: r for r in rows if int(r["length"]) == 16}
    for row in at_1x.values():  # yarn at factor 1 is the unscaled model
        assert row["task"] == "copy" and int(row["examples"]) == 32 and int(row["answers"]) == 32
        assert float(row["exact_match"]) >= 0.9 and float(row["exact_match_low"]) <= float(row["exact_match"])
    assert at_1x["none"]["exact_match"] == at_1x["yarn"]["exact_match"]
    data = json.loads((out / "results.json").read_text())
    assert data["perplexity"] == [] and len(data["accuracy"]) == len(rows)
    effective = {e["method"]: e for e in data["effective_length"]}
    assert set(effective) == {"none", "yarn"} and all(e["effective_length"] >= 16 for e in effective.values())
    report = (out / "report.md").read_text()
    assert "Task accuracy against evaluation length" in report and (out / "accuracy_vs_length.png").is_file()


def make_commands(*args: str) -> list[str]:
    """The commands `make -n <args>` would run, continuation lines joined; setup's fetch of the books left out."""
    done = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.replace("\\\n", " ").splitlines()
            if "scripts/" in line and "scripts/fetch_books.py" not in line]


def test_make_compare_gives_args_to_training_and_eval_args_to_the_evaluation():
    train, evaluate = make_commands("compare", "ARGS=trainer.max_steps=5", "EVAL_ARGS=lengths=[64,128] passkey_trials=2")
    assert "scripts/train.py" in train and train.endswith(" trainer.max_steps=5")
    assert "scripts/eval_extrapolate.py" in evaluate and evaluate.endswith(" lengths=[64,128] passkey_trials=2")
    assert "lengths=" not in train and "trainer.max_steps" not in evaluate
    # the studies split them the same way; a target that only evaluates refuses ARGS instead of dropping it
    commands = make_commands("extrapolation", "ARGS=trainer.max_steps=5", "EVAL_ARGS=batch_size=2")
    assert all(("trainer.max_steps=5" in c) == ("train.py" in c) for c in commands)
    assert all(("batch_size=2" in c) == ("eval_extrapolate.py" in c) for c in commands)
    done = subprocess.run(["make", "-n", "real-models", "ARGS=device=cpu"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "ARGS=device=cpu: real-models only evaluates; give its overrides as EVAL_ARGS" \
        in done.stderr
