"""A run folder handed over by someone else is data, not instructions (issue 32, cases 5, 6, 7, 8, 11, 12):
what its config.yaml may set is minillm.runs.READ_FROM_RUN, it cannot move a cache, a YAML tag or _target_ key is
refused in one line; a number is reported only from finite weights and the model's own tokenizer; a cache must be
what it claims to be. Script cases run the real scripts on one tiny text run, copied and tampered with per test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from minillm.data.tokens import train_tokenizer
from minillm.registry import ConfigError
from minillm.runs import READ_FROM_RUN, CheckpointError, RunFolder, find_runs, load_checkpoint
from minillm.train.checkpoints import last_good_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context_length=32", "data.batch_size=4",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "data.val_windows=4", "tokenizer.vocab_size=300",
        "logger=csv"]
FAST_EVAL = ["logger=csv", "max_documents=1", "buckets=4", "lengths=[32]", "scalings=[none]", "passkey_trials=0",
             "tail_loss=false"]
WORDS = "the of and to in is that for it as was with be by on not this are or from at which but have an".split()


def documents(folder: Path) -> Path:
    """40 small .txt documents of plain words: a 300-token BPE and a 32-token model train on them in seconds."""
    folder.mkdir(parents=True)
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(150 + 5 * i)))
    return folder


def script(name: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    """python scripts/<name> ARGS from the repository root: offline, one thread, a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_SILENT="true")
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def refused(result: subprocess.CompletedProcess, starts: str) -> str:
    """Exit 2 and one line on stderr, 'error: <starts>...'; the line."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {starts}"), result.stderr[-3000:]
    return lines[0]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny text run (300-token tokenizer, local documents), trained once for this module."""
    root = tmp_path_factory.mktemp("trained")
    docs = documents(root / "docs")
    result = script("train.py", root, *TINY, f"data.path={docs}", f"data.cache_dir={root / 'train_cache'}",
                    f"hydra.run.dir={root / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


@pytest.fixture
def handed_over(trained, tmp_path) -> Path:
    """A copy of the trained run, as someone hands it over: to be tampered with."""
    return Path(shutil.copytree(trained, tmp_path / "handed_over"))


def edit_config(run: Path, edit) -> None:
    settings = yaml.safe_load((run / "config.yaml").read_text())
    edit(settings)
    (run / "config.yaml").write_text(yaml.safe_dump(settings))


def poison(checkpoint: Path, value: float) -> str:
    """Put `value` into one weight of the checkpoint; the tensor's name."""
    saved = torch.load(checkpoint, weights_only=True)
    name = sorted(k for k in saved["state_dict"] if k.startswith("model."))[1]
    saved["state_dict"][name].view(-1)[3] = value
    torch.save(saved, checkpoint)
    return name


# ----------------------------------------------------------------------------------------------
# What a run folder's config.yaml may set (in process)


def run_folder(tmp_path: Path, text: str, name: str = "run") -> RunFolder:
    """A folder whose config.yaml is `text`, read with the reader's cache under tmp_path/ours."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.yaml").write_text(text)
    return RunFolder(tmp_path / name, cache_dir=str(tmp_path / "ours"))


def test_only_the_settings_read_from_a_run_are_taken_from_its_config(tmp_path):
    settings = {"seed": 3, "ckpt_path": "/elsewhere", "hydra": {"run": {"dir": "/elsewhere"}},
                "logger": {"group": "g", "kind": "wandb", "project": "theirs"},
                "trainer": {"max_steps": 10 ** 9}, "tokenizer": {"path": "/etc/passwd"},
                "data": {"path": "stdlib", "cache_dir": str(tmp_path / "theirs"), "batch_size": 999, "num_workers": 64,
                         "val_fraction": 0.25, "max_documents": 30}}
    run = run_folder(tmp_path, yaml.safe_dump(settings))
    taken = run.read_from_run()
    keys = {f"{section}.{key}" for section, values in taken.items() if isinstance(values, dict) for key in values}
    assert keys | {key for key, value in taken.items() if not isinstance(value, dict)} <= set(READ_FROM_RUN)
    assert taken == {"seed": 3, "logger": {"group": "g"},
                     "data": {"path": "stdlib", "val_fraction": 0.25, "max_documents": 30}}
    data = run.data_config()
    assert data.cache_dir == str(tmp_path / "ours")  # the reader's, never the folder's
    assert (data.path, data.val_fraction, data.max_documents, data.batch_size, data.num_workers) == \
           ("stdlib", 0.25, 30, 16, 0)  # what it may not set keeps the code's default
    assert RunFolder(run.path).data_config().cache_dir == "~/.cache/minillm"  # no cache_dir given: the default
    assert (run.seed, run.wandb_group) == (3, "g")


@pytest.mark.parametrize("text, message", [
    ("seed: !!python/object/apply:os.system ['echo hi']\n",
     r"config.yaml: line 1: the YAML tag !!python/object/apply:os.system would build an object; a run's settings "
     r"are plain values$"),
    ("seed: 1\ndata:\n  path: stdlib\n  _target_: os.system\n",
     r"config.yaml: data._target_='os.system' names an object to build; a run's settings are plain values$"),
    ("seed: 1\nlogger:\n  tags:\n    - _target_: builtins.exec\n",
     r"config.yaml: logger.tags.0._target_='builtins.exec' names an object to build"),
    ("seed: 1\nlogger:\n  group: ${oc.env:HOME}\n",
     r"config.yaml: logger.group='\$\{oc.env:HOME\}' is an interpolation; a run's settings are plain values"),
    ("seed: [1, 2\n", r"config.yaml: line 2: not valid YAML \("),
    ("- 1\n- 2\n", r"config.yaml: not a run's settings \(a YAML list"),
    ("seed: 1\ndata: stdlib\n", r"config.yaml: data must hold settings, got 'stdlib'$"),
    ("seed: one\n", r"config.yaml: seed must be a whole number, got 'one'$"),
])
def test_a_config_that_is_not_plain_settings_is_refused_in_one_line(tmp_path, text, message):
    run = run_folder(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{run.path}/{message}") as caught:
        run.seed
    assert "\n" not in str(caught.value)


def test_a_data_setting_of_the_wrong_type_names_the_file_and_the_setting(tmp_path):
    run = run_folder(tmp_path, "seed: 1\ndata:\n  path: stdlib\n  max_documents: many\n")
    with pytest.raises(ConfigError, match=rf"^{run.config}: data.max_documents: Value 'many' of type 'str' could "
                                          rf"not be converted to Integer$"):
        run.data_config()
    run = run_folder(tmp_path, "seed: 1\ndata:\n  path: stdlib\n  val_fraction: 2.0\n", name="other")
    with pytest.raises(ConfigError, match=rf"^{run.config}: data.val_fraction: must be in \(0, 1\), got 2.0$"):
        run.data_config()


# ----------------------------------------------------------------------------------------------
# Checkpoints: finite weights; what ckpt names (in process)


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path):
    from minillm.model.config import ModelConfig
    from minillm.model.transformer import Transformer

    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step, name in ((3, "good.ckpt"), (5, "nan.ckpt")):
        torch.save({"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
                    "hyper_parameters": {"model": model.cfg.to_dict()}, "global_step": step}, folder / name)
    tensor = poison(folder / "nan.ckpt", float("nan"))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {folder / 'nan.ckpt'} holds weights that are not "
                                              rf"finite: {tensor} has 1 NaN and 0 infinite values of \d+$"):
        load_checkpoint(folder / "nan.ckpt")
    load_checkpoint(folder / "good.ckpt")
    os.utime(folder / "nan.ckpt", ns=(2 * 10 ** 18, 2 * 10 ** 18))  # the newest: skipped for the good one
    assert last_good_checkpoint(folder) == (folder / "good.ckpt", 3)


def test_ckpt_that_is_a_device_or_a_pipe_says_so():
    with pytest.raises(CheckpointError, match=r"^ckpt: /dev/null is neither a regular file nor a folder"):
        find_runs("/dev/null")


def test_ckpt_path_that_is_a_device_says_so(tmp_path):
    from minillm.train.resume import resolve_checkpoint

    with pytest.raises(ConfigError, match=r"^ckpt_path: /dev/null is not a regular file \(a device or a pipe\?\)"):
        resolve_checkpoint("/dev/null", tmp_path)


@pytest.mark.parametrize("entry", ["tokenizer.json", "config.yaml", "checkpoints/best.ckpt"])
def test_a_link_inside_a_run_folder_is_refused_to_readers(tmp_path, entry):
    """A run folder read for evaluation or fine-tuning cannot send a read outside itself through a link."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("tokenizer.json", "config.yaml", "checkpoints/best.ckpt"):
        (run / name).write_text("x")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("someone else's file")
    (run / entry).unlink()
    (run / entry).symlink_to(outside)
    with pytest.raises(ConfigError, match=rf"^ckpt: {run / entry} is a symbolic link \(to {outside}\); a run "
                                              r"folder is read as it is"):
        find_runs(run)


# ----------------------------------------------------------------------------------------------
# Through the scripts


@pytest.mark.slow
def test_a_run_folder_cannot_move_where_the_evaluation_writes(handed_over, tmp_path):
    """Case 5a: the folder's data.cache_dir names a folder elsewhere; the evaluation caches the run's documents
    under its own data.cache_dir and writes nothing else outside its output folder."""
    edit_config(handed_over, lambda s: s["data"].update(cache_dir=str(tmp_path / "elsewhere")))
    home, out, ours = tmp_path / "home", tmp_path / "eval", tmp_path / "ours"  # HOME: matplotlib's font cache
    docs = Path(yaml.safe_load((handed_over / "config.yaml").read_text())["data"]["path"])  # read, not written
    before = {p: p.stat().st_mtime_ns for p in files_under(tmp_path) | files_under(docs)}
    result = script("eval_extrapolate.py", home, f"ckpt={handed_over}", *FAST_EVAL, f"data.cache_dir={ours}",
                    f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "elsewhere").exists()
    written = {p for p in files_under(tmp_path) | files_under(docs)
               if p not in before or p.stat().st_mtime_ns != before[p]}
    outside = sorted(str(p) for p in written if not {out, ours, home} & set(p.parents))
    assert written and not outside, outside
    assert any((ours / "tokens").iterdir()) and (out / "results.json").is_file()


@pytest.mark.slow
def test_a_resume_caches_where_its_command_line_says_not_where_the_folder_does(handed_over, tmp_path):
    """Case 5a on resume: the folder's data.cache_dir names a folder elsewhere; the resume caches under its own
    (here the default, under HOME) and records that in config.yaml."""
    edit_config(handed_over, lambda s: s["data"].update(cache_dir=str(tmp_path / "elsewhere")))
    home = tmp_path / "home"
    result = script("train.py", home, f"hydra.run.dir={handed_over}", "ckpt_path=last", "trainer.max_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "elsewhere").exists()
    assert any((home / ".cache" / "minillm").rglob("*.npy")) or any((home / ".cache" / "minillm").rglob("*.bin"))
    saved = yaml.safe_load((handed_over / "config.yaml").read_text())
    assert saved["data"]["cache_dir"] != str(tmp_path / "elsewhere")
    assert load_checkpoint(handed_over / "checkpoints" / "last.ckpt")["global_step"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("tamper, message", [
    (lambda text: text.replace("seed: 0", "seed: !!python/object/apply:os.system ['touch pwned']"),
     "line {line}: the YAML tag !!python/object/apply:os.system would build an object"),
    (lambda text: text.replace("\ndata:\n", "\ndata:\n  _target_: os.system\n"),
     "data._target_='os.system' names an object to build"),
], ids=["yaml-tag", "target"])
def test_a_config_with_a_yaml_tag_or_target_is_one_line_and_runs_nothing(handed_over, tmp_path, tamper, message):
    """Case 5c: not executed, and not a 14-20 line traceback: one line naming the file and what is wrong."""
    text = tamper((handed_over / "config.yaml").read_text())
    (handed_over / "config.yaml").write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "!!python" in row) if "!!" in text else 0
    out = tmp_path / "eval"
    result = script("eval_extrapolate.py", tmp_path, f"ckpt={handed_over}", *FAST_EVAL, f"hydra.run.dir={out}")
    refused(result, f"{handed_over / 'config.yaml'}: {message.format(line=line)}")
    assert not (REPO / "pwned").exists() and not (tmp_path / "pwned").exists()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_non_finite_weights_are_named_on_evaluation_resume_and_fine_tuning(handed_over, tmp_path):
    """Case 6: evaluated, the run reported n/a cells with exit 0; resumed, it stopped without naming the NaN."""
    tensor = poison(handed_over / "checkpoints" / "best.ckpt", float("nan"))
    poison(handed_over / "checkpoints" / "last.ckpt", float("inf"))
    best, last = handed_over / "checkpoints" / "best.ckpt", handed_over / "checkpoints" / "last.ckpt"
    result = script("eval_extrapolate.py", tmp_path, f"ckpt={handed_over}", *FAST_EVAL,
                    f"hydra.run.dir={tmp_path / 'eval'}")
    refused(result, f"checkpoint {best} holds weights that are not finite: {tensor} has 1 NaN and 0 infinite")
    result = script("train.py", tmp_path, f"hydra.run.dir={handed_over}", "ckpt_path=last", "trainer.max_steps=6")
    refused(result, f"ckpt_path: checkpoint {last} holds weights that are not finite: {tensor} has 0 NaN and 1 "
                    f"infinite")
    docs = yaml.safe_load((handed_over / "config.yaml").read_text())["data"]["path"]
    result = script("train.py", tmp_path, f"init_from={handed_over}", *TINY, f"data.path={docs}",
                    f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'tuned'}")
    refused(result, f"init_from: checkpoint {best} holds weights that are not finite")


@pytest.mark.slow
def test_a_tokenizer_of_another_vocabulary_is_refused(handed_over, tmp_path):
    """Case 7: a 280-token tokenizer.json beside a 300-token model evaluated with a plausible perplexity."""
    texts = [p.read_text() for p in sorted(Path(yaml.safe_load((handed_over / "config.yaml").read_text())
                                                ["data"]["path"]).iterdir())]
    train_tokenizer(texts, vocab_size=280, min_frequency=1).save(str(handed_over / "tokenizer.json"))
    result = script("eval_extrapolate.py", tmp_path, f"ckpt={handed_over}", *FAST_EVAL,
                    f"hydra.run.dir={tmp_path / 'eval'}")
    refused(result, f"ckpt: {handed_over / 'tokenizer.json'} has 280 tokens, the model of "
                    f"{handed_over / 'checkpoints' / 'best.ckpt'} 300: the run folder's tokenizer is not the "
                    f"checkpoint's")


@pytest.mark.slow
def test_a_cached_tokenizer_swapped_for_another_does_not_decide_the_vocabulary(trained, tmp_path):
    """Case 8: the cached 300-token BPE replaced by a valid 280-token one; a run asking for 300 trained on the
    swapped one. Its record no longer vouches for it: trained again, with a warning naming the file."""
    cache = Path(shutil.copytree(trained.parent / "train_cache", tmp_path / "cache"))
    (cached,) = (p for p in (cache / "tokenizers").glob("bpe-*.json") if not p.name.endswith(".record.json"))
    docs = trained.parent / "docs"
    train_tokenizer([p.read_text() for p in sorted(docs.iterdir())], vocab_size=280, min_frequency=1) \
        .save(str(cached))
    result = script("train.py", tmp_path, *TINY, f"data.path={docs}", f"data.cache_dir={cache}",
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cached tokenizer {cached} is not what it claims" in result.stdout + result.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == 300
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["model"]["vocab"].__len__() == 300


@pytest.mark.slow
def test_messages_name_the_setting_not_the_library(tmp_path):
    """Case 12: a device as ckpt, a text field of numbers, a cache_dir that is a file; each one line, exit 2."""
    refused(script("eval_extrapolate.py", tmp_path, "ckpt=/dev/urandom", f"hydra.run.dir={tmp_path / 'eval'}"),
            "ckpt: /dev/urandom is neither a regular file nor a folder")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(4)))
    refused(script("train.py", tmp_path, *TINY, f"data.path={numbers}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"hydra.run.dir={tmp_path / 'numbers'}"),
            f"data.text_field='text': none of the 4 rows of data.path='{numbers}' holds text in it, only int64 values")
    (tmp_path / "a_file").write_text("x")
    refused(script("train.py", tmp_path, *TINY, f"data.path={numbers}", f"data.cache_dir={tmp_path / 'a_file'}",
                   f"hydra.run.dir={tmp_path / 'file_cache'}"),
            f"data.cache_dir='{tmp_path / 'a_file'}': cannot hold the caches ({tmp_path / 'a_file'} is a file, not "
            f"a folder)")


@pytest.mark.slow
def test_a_transformers_folder_whose_config_transformers_rejects_is_one_line(tmp_path):
    """Case 11: config.json with a field of the wrong type gave an 88-line traceback."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    folder = tmp_path / "tiny-llama"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    fields = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**fields, "num_attention_heads": "two"}))
    result = script("eval_extrapolate.py", tmp_path, f"ckpt=hf:{folder}", "logger=csv",
                    f"hydra.run.dir={tmp_path / 'eval'}")
    refused(result, f"ckpt: the config of {folder} could not be read (TypeError: Field 'num_attention_heads' "
                    f"expected int, got str")
