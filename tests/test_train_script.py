"""scripts/train.py end to end, as users run it (subprocess, offline, no W&B key), and the conf/ tree:
every option composes into the dataclasses, no YAML restates a code default, registries match file names."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from filelock import FileLock
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer

from minillm.data.config import DataConfig, TokenizerConfig
from minillm.eval.config import EvalConfig
from minillm.tracking import LoggerConfig
from minillm.model.config import ModelConfig
from minillm.train.config import OptimConfig, RunConfig, TrainerConfig
from minillm.cli import register_configs
from minillm.model.transformer import Transformer
from minillm.positions.base import POSITION_ENCODINGS
from minillm.positions.rotary import RotaryConfig
from minillm.positions.samplers import POSITION_SAMPLERS
from minillm.positions.scaling import SCALINGS
from minillm.registry import ConfigError
from minillm.registry import to_run_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MAX_STEPS = 6
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context_length=32", "data.batch_size=4",
         f"trainer.max_steps={MAX_STEPS}", "trainer.val_check_interval=3", "trainer.checkpoint_every_n_steps=3",
         "data.val_windows=4", "tokenizer.vocab_size=300"]
RESULT_LINE = re.compile(r"^val/loss (\d+\.\d{4}) after ([\d,]+) tokens; results in (.+)$", re.M)
TRAIN_KEYS = {"train/loss", "train/lr", "train/tokens", "train/tokens_per_s", "train/mfu"}
VAL_KEYS = {"val/loss", "val/ppl"}


# ----------------------------------------------------------------------------------------------
# Running the script


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id) -> Path:
    """A folder every xdist worker of this session sees (each worker's basetemp is a child of it)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def env(shared) -> dict[str, str]:
    """A user with no W&B credentials (no key, no ~/.netrc) and no network to the HF hub."""
    home = shared / "home"
    home.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    return {**clean, "HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def cache_dir(shared) -> Path:
    """One data cache for the session: the stdlib tokenizer and token streams are built once."""
    return shared / "data_cache"


def train(env: dict, *args: str) -> SimpleNamespace:
    """python scripts/train.py ARGS from the repository root, as a user would."""
    done = subprocess.run([sys.executable, "scripts/train.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return SimpleNamespace(rc=done.returncode, out=done.stdout, err=done.stderr)


def small_run(env: dict, cache_dir: Path, run_dir: Path, *args: str) -> SimpleNamespace:
    return train(env, *SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *args)


def assert_ok(result: SimpleNamespace) -> None:
    assert result.rc == 0, f"exit {result.rc}\n--- stdout\n{result.out[-3000:]}\n--- stderr\n{result.err[-3000:]}"


def once(shared: Path, name: str, make):
    """make(folder) -> JSON-able result, computed once per session even across xdist workers."""
    folder, result = shared / name, shared / name / "result.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not result.is_file():
            folder.mkdir(exist_ok=True)
            result.write_text(json.dumps(make(folder)))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def stdlib_run(shared, env, cache_dir) -> SimpleNamespace:
    """The first run on the embedded corpus, default logger (W&B, offline): it builds the shared caches."""
    def make(folder: Path) -> dict:
        result = small_run(env, cache_dir, folder / "run", "rope=rotate_half", "trainer.log_every_n_steps=2")
        return {**vars(result), "run_dir": str(folder / "run")}

    result = SimpleNamespace(**once(shared, "stdlib_run", make))
    assert_ok(result)
    result.run_dir = Path(result.run_dir)
    return result


@pytest.fixture(scope="session")
def small_corpus(shared) -> Path:
    """A 30-document jsonl, identical in every worker (so its caches are shared too): for the tests
    that exercise the run machinery rather than the corpus."""
    return Path(once(shared, "small_corpus", lambda folder: str(write_dataset("jsonl", folder, documents()))))


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metric_rows(run_dir: Path) -> list[dict[str, float]]:
    """metrics.csv rows with their empty cells dropped."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def wandb_records(run_dir: Path) -> list:
    """Every record in the offline run's .wandb transaction log.

    The log is LevelDB's log format: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks
    of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last);
    a block's tail shorter than a header is padding. Each whole record is a protobuf `Record`.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32 * 1024, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


# ----------------------------------------------------------------------------------------------
# The embedded corpus, logged to W&B offline


@pytest.mark.slow
def test_stdlib_run_writes_a_complete_run_folder(stdlib_run):
    run_dir = stdlib_run.run_dir
    (line,) = RESULT_LINE.findall(stdlib_run.out)
    loss, tokens, results_in = line
    assert Path(results_in) == run_dir
    assert int(tokens.replace(",", "")) == MAX_STEPS * 4 * 32  # steps · batch · context

    for name in ("config.yaml", "tokenizer.json", "metrics.csv", "summary.json", "val_loss.png", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt", "checkpoints/step-000003.ckpt", "checkpoints/step-000006.ckpt"):
        assert (run_dir / name).is_file(), name

    result = summary(run_dir)
    assert result["steps"] == MAX_STEPS
    assert math.isfinite(result["val_loss"]) and 0 < result["val_loss"] < math.log(300) + 1
    assert float(loss) == pytest.approx(result["val_loss"], abs=1e-4)
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-4)
    assert result["data_fingerprint"]["dataset"]["path"] == "stdlib"

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    vocab = Tokenizer.from_file(str(run_dir / "tokenizer.json")).get_vocab_size()
    assert config["model"]["vocab_size"] == vocab == 300
    assert config["rope"]["variant"] == config["model"]["rope"]["variant"] == "rotate_half"
    assert config["trainer"]["max_steps"] == MAX_STEPS and config["logger"]["kind"] == "wandb"

    rows = metric_rows(run_dir)
    assert TRAIN_KEYS | VAL_KEYS <= set().union(*rows)
    assert [row["val/loss"] for row in rows if "val/loss" in row][-1] == pytest.approx(result["val_loss"])


@pytest.mark.slow
def test_stdlib_run_logs_to_an_offline_wandb_run(stdlib_run):
    records = wandb_records(stdlib_run.run_dir)
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "history", "exit"} <= kinds  # started, logged, and finished

    history = wandb_history(records)
    assert TRAIN_KEYS | VAL_KEYS <= set().union(*history)
    val = [row["val/loss"] for row in history if "val/loss" in row]
    assert len(val) == MAX_STEPS // 3 and val[-1] == pytest.approx(summary(stdlib_run.run_dir)["val_loss"])

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "minillm" and "rope=rotate_half" in run.tags
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["rope"]["variant"] == "rotate_half"
    assert config["data_fingerprint"]["tokenizer"]["vocab_size"] == 300


# ----------------------------------------------------------------------------------------------
# Local datasets


def documents(count: int = 30) -> list[str]:
    words = ("the river model token window rope angle train loss value cache folder sweep layer head "
             "query key vector length scale decay step batch shard frame").split()
    rng = random.Random(0)
    return [f"Document {i}. " + " ".join(rng.choice(words) for _ in range(150)) + "." for i in range(count)]


def write_dataset(kind: str, folder: Path, texts: list[str]) -> Path:
    if kind == "txt-folder":
        for i, text in enumerate(texts):  # one file is one document; subfolders are read too
            path = folder / "corpus" / ("part2" if i % 2 else "part1") / f"doc{i:02d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return folder / "corpus"
    if kind == "jsonl":
        path = folder / "corpus.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["txt-folder", "jsonl", "parquet"])
def test_local_dataset_trains(kind, tmp_path, env, cache_dir):
    texts = documents()
    path = write_dataset(kind, tmp_path, texts)
    result = small_run(env, cache_dir, tmp_path / "run", f"data.path={path}", "logger=csv")
    assert_ok(result)
    done = summary(tmp_path / "run")
    assert done["steps"] == MAX_STEPS and math.isfinite(done["val_loss"])
    dataset = done["data_fingerprint"]["dataset"]
    assert dataset["path"] == str(path) and dataset["documents"] == len(texts)
    split = done["data_fingerprint"]["split"]
    assert split["train_documents"] + split["val_documents"] == len(texts) and split["val_documents"] >= 1
    vocab = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json")).get_vocab_size()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == vocab


# ----------------------------------------------------------------------------------------------
# Sweeps and resuming


@pytest.mark.slow
def test_multirun_writes_one_folder_per_value(tmp_path, env, cache_dir, stdlib_run):
    result = train(env, "-m", "rope=complex,alibi", *SMALL, f"data.cache_dir={cache_dir}", "logger=csv",
                   f"hydra.sweep.dir={tmp_path}")
    assert_ok(result)
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in runs] == ["0", "1"]
    assert sorted(Path(d) for _, _, d in RESULT_LINE.findall(result.out)) == runs
    for run_dir, variant in zip(runs, ("complex", "alibi")):
        assert f"rope-{variant}" in run_dir.name
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["rope"]["variant"] == variant
        done = summary(run_dir)
        assert done["steps"] == MAX_STEPS and math.isfinite(done["val_loss"])


@pytest.mark.slow
def test_multirun_with_many_overrides(tmp_path, env, cache_dir, small_corpus):
    result = train(env, "-m", "rope=complex", *SMALL, "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                   "optim.warmup_steps=2", "optim.lr=0.001", "data.long_documents=4", "data.val_fraction=0.1",
                   "logger=csv", f"data.path={small_corpus}", f"data.cache_dir={cache_dir}",
                   f"hydra.sweep.dir={tmp_path}")
    assert "File name too long" not in result.err
    assert_ok(result)
    (done,) = tmp_path.rglob("summary.json")
    assert summary(done.parent)["steps"] == 3


@pytest.mark.slow
def test_sweep_over_a_data_path_keeps_one_folder_per_run(tmp_path, env, cache_dir, small_corpus):
    from minillm.runs import find_runs

    result = train(env, "-m", f"data.path={small_corpus}", *SMALL, "trainer.max_steps=3", "logger=csv",
                   f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}")
    assert_ok(result)
    assert [p.parent for p in tmp_path.rglob("summary.json")] == [p for p in tmp_path.iterdir() if p.is_dir()]
    (run,) = find_runs(tmp_path)
    assert summary(run.folder)["steps"] == 3


@pytest.mark.slow
def test_resume_continues_from_the_last_checkpoint(tmp_path, env, cache_dir, small_corpus):
    run_dir = tmp_path / "run"
    common = (f"data.path={small_corpus}", "logger=csv", "trainer.log_every_n_steps=1")
    assert_ok(small_run(env, cache_dir, run_dir, *common))
    before = metric_rows(run_dir)
    assert sorted(int(r["step"]) for r in before if "train/loss" in r) == list(range(MAX_STEPS))

    resumed = small_run(env, cache_dir, run_dir, *common, "ckpt_path=last", "trainer.max_steps=9")
    assert_ok(resumed)
    assert summary(run_dir)["steps"] == 9
    assert (run_dir / "checkpoints" / "step-000009.ckpt").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    rows = metric_rows(run_dir)
    train_rows = {int(r["step"]): r for r in rows if "train/loss" in r}
    assert {6, 7, 8} <= set(train_rows)  # the new steps, numbered after the old ones
    # The scheduler resumed too: still warming up (100 steps), lr = 3e-3 · (step + 1) / 100.
    for step in (6, 7, 8):
        assert train_rows[step]["train/lr"] == pytest.approx(3e-3 * (step + 1) / 100, rel=1e-6)
        assert train_rows[step]["train/tokens"] == (step + 1) * 4 * 32
    # The earlier rows are kept: metrics.csv holds the whole run, each step once.
    assert sorted(int(r["step"]) for r in rows if "train/loss" in r) == list(range(9))
    for old in before:
        assert old in rows


@pytest.mark.slow
def test_resume_without_a_checkpoint_names_the_setting(tmp_path, env, cache_dir, small_corpus):
    result = small_run(env, cache_dir, tmp_path / "empty", f"data.path={small_corpus}", "ckpt_path=last",
                       "logger=none")
    assert result.rc == 2 and "Traceback" not in result.err
    assert f"ckpt_path: no checkpoint at {tmp_path / 'empty' / 'checkpoints' / 'last.ckpt'}" in result.err


@pytest.mark.slow
def test_run_shorter_than_the_validation_interval_still_validates(tmp_path, env, cache_dir, small_corpus):
    result = small_run(env, cache_dir, tmp_path / "run", f"data.path={small_corpus}", "logger=csv",
                       "trainer.max_steps=2")  # val_check_interval=3
    assert_ok(result)
    done = summary(tmp_path / "run")
    assert done["steps"] == 2 and math.isfinite(done["val_loss"])
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


# ----------------------------------------------------------------------------------------------
# Synthetic tasks: generated from the seed, the loss on the answers only

@pytest.mark.slow
def test_synthetic_copy_run_learns_the_task_at_its_training_length(synthetic_run):
    run = summary(synthetic_run)
    assert run["val_exact_match"] >= 0.9 and run["val_loss"] < 0.3, run
    assert run["data_fingerprint"]["dataset"]["task"] == "copy"
    config = yaml.safe_load((synthetic_run / "config.yaml").read_text())
    assert config["data"]["task"] == "copy" and config["data"]["tasks"]["copy"]["num_symbols"] == 8
    tokenizer = Tokenizer.from_file(str(synthetic_run / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 10 and tokenizer.decode([1, 2, 9]) == "| s0 s7"
    logged = [row for row in metric_rows(synthetic_run) if "val/exact_match" in row]
    assert len(logged) == 3 and logged[-1]["val/exact_match"] == run["val_exact_match"]


# ----------------------------------------------------------------------------------------------
# Bad configurations and bad data fail fast, naming what is wrong


@pytest.mark.slow
@pytest.mark.parametrize("override, setting, detail", [
    ("rope.thetaa=1", "rope.thetaa", "Key 'thetaa' not in 'RotaryConfig'"),
    ("trainer.max_steps=abc", "trainer.max_steps", "could not be converted to Integer"),
    ("rope.theta=-1", "rope.theta", "must be a finite positive number"),
    ("model.n_heads=3", "model.n_heads", "not divisible by n_heads=3"),
], ids=["unknown-key", "wrong-type", "invalid-value", "heads-do-not-divide"])
def test_bad_config_exits_naming_the_setting(override, setting, detail, tmp_path, env, cache_dir):
    result = small_run(env, cache_dir, tmp_path / "run", override)
    assert result.rc != 0
    assert setting in result.err and detail in result.err, result.err
    assert "Traceback" not in result.err and "results in" not in result.out
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_missing_data_path_exits_with_a_clear_message(tmp_path, env, cache_dir):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    result = small_run(env, cache_dir, tmp_path / "run", f"data.path={missing}", "logger=none")
    assert result.rc == 2
    assert f"data.path='{missing}': no such file or folder" in result.err
    assert "Traceback" not in result.err


@pytest.mark.slow
def test_jsonl_without_the_text_field_lists_the_fields_it_has(tmp_path, env, cache_dir):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(documents(4))))
    result = small_run(env, cache_dir, tmp_path / "run", f"data.path={path}", "logger=none")
    assert result.rc == 2
    assert "data.text_field='text' is not a column" in result.err
    assert "['id', 'body']" in result.err or "['body', 'id']" in result.err, result.err
    assert "Traceback" not in result.err


# ----------------------------------------------------------------------------------------------
# Caches


@pytest.mark.slow
def test_second_run_reuses_the_tokenizer_and_token_caches(tmp_path, env, cache_dir, stdlib_run):
    # stdlib_run was the first to use the session's cache: it trained the tokenizer and wrote the streams.
    first = summary(stdlib_run.run_dir)
    assert "training a 300-token byte-level BPE" in (stdlib_run.run_dir / "train.log").read_text()
    # Its cache files: the tokenizer (the bytes the run folder got) and the token streams (by length).
    tokenizer = (stdlib_run.run_dir / "tokenizer.json").read_bytes()
    (bpe,) = [p for p in cache_dir.glob("tokenizers/bpe-*.json") if p.read_bytes() == tokenizer]
    (streams,) = [p.parent for p in cache_dir.glob("tokens/*/train.json")
                  if json.loads(p.read_text())["length"] == first["data_fingerprint"]["tokens"]["train"]]
    cached = {p: p.stat().st_mtime_ns for p in [bpe, *streams.iterdir()]}
    assert {"train.npy", "val.npy", "val_starts.npy"} <= {p.name for p in cached}

    result = small_run(env, cache_dir, tmp_path / "run", "rope=rotate_half", "trainer.log_every_n_steps=2")
    assert_ok(result)
    assert "byte-level BPE" not in (tmp_path / "run" / "train.log").read_text() + result.out + result.err
    assert {p: p.stat().st_mtime_ns for p in cached} == cached  # read, not rewritten
    again = summary(tmp_path / "run")
    assert again["data_fingerprint"] == first["data_fingerprint"]
    assert again["val_loss"] == pytest.approx(first["val_loss"], abs=1e-5)  # same seed, same data, same run
    assert again["wall_seconds"] < first["wall_seconds"] / 2, (again["wall_seconds"], first["wall_seconds"])


# ----------------------------------------------------------------------------------------------
# conf/: composition in-process (what Hydra hands scripts/train.py)


@contextmanager
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def compose_run(*overrides: str) -> RunConfig:
    with hydra_conf():
        return to_run_config(compose("config", overrides=list(overrides)))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for every leaf, leaving out Hydra's own keys."""
    out = {}
    for key, value in tree.items():
        if key in ("defaults", "hydra"):
            continue
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def lookup(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def runs_model(model_cfg: ModelConfig) -> Transformer:
    """Build the configured model (small vocabulary) and check a forward pass gives finite logits."""
    model = Transformer(ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": 64}))
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    return model


def test_documented_command_rotate_half_with_a_large_base():
    run = compose_run("rope=rotate_half", "rope.theta=500000")
    assert run.rope == run.model.rope == RotaryConfig(variant="rotate_half", theta=500000.0)
    position = runs_model(run.model).position
    assert (position.variant, position.theta) == ("rotate_half", 500000.0)


def test_documented_command_xpos():
    run = compose_run("rope=xpos", "rope.xpos_scale_base=512")
    assert run.model.rope == RotaryConfig(variant="complex", xpos_scale_base=512)
    assert runs_model(run.model).position.xpos_scale_base == 512


def test_documented_command_yarn():
    run = compose_run("rope=complex", "rope_scaling=yarn", "rope_scaling.factor=4")
    assert type(run.model.rope_scaling) is SCALINGS["yarn"] and run.model.rope_scaling.factor == 4
    position = runs_model(run.model).position
    assert position.scaling.name == "yarn" and position.scaling.original_max_position == run.model.context_length
    assert position.attention_factor == pytest.approx(0.1 * math.log(4) + 1)  # YaRN's temperature


def test_default_composition_is_the_code_defaults():
    run = compose_run()
    assert run == RunConfig()


GROUPS = ["model", "rope", "rope_scaling", "positions", "data", "tokenizer", "optim", "trainer", "logger", "experiment"]


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_into_the_dataclasses(group, option):
    if group == "rope_scaling" and not SCALINGS[option].from_factor:  # factors searched for one model: none here
        with pytest.raises(ValueError, match=rf"^rope_scaling.short_factor: {option} needs its searched factors"):
            compose_run(f"{group}={option}")
        return
    # A sampler that reaches past the window takes its reach from a scaling's extended length.
    run = compose_run(f"{group}={option}", *(["rope_scaling=yarn"] if group == "positions" else []))
    assert isinstance(run, RunConfig) and isinstance(run.model, ModelConfig)
    values = leaves(load_yaml(CONF / group / f"{option}.yaml"))
    if group == "experiment":  # a global overlay: its paths start at the root
        for path, value in values.items():
            if not (isinstance(value, str) and "${" in value):  # an interpolation compares as resolved
                assert lookup(run, path) == value, path
        return
    node = getattr(run, group)
    for key, value in values.items():
        assert getattr(node, key) == value, f"{group}.{key}"
    if group == "rope":
        assert run.model.rope is run.rope
        assert run.rope.variant == ("complex" if option == "xpos" else option)
    if group == "rope_scaling":
        # the model's is the group's with the trained length resolved (the model's own, unless the group names one)
        expected = run.rope_scaling if option == "none" else run.rope_scaling.trained_at(run.model.context_length)
        assert run.model.rope_scaling == expected
        assert run.model.rope_scaling.original_max_position == (None if option == "none" else run.model.context_length)
        assert run.rope_scaling.type == option and type(run.rope_scaling) is SCALINGS[option]


def test_eval_config_composes():
    with hydra_conf():
        config = to_run_config(compose("eval", overrides=["ckpt=outputs/train/x", "logger=csv"]))
    assert isinstance(config, EvalConfig) and config.checkpoints == ["outputs/train/x"]
    assert config.logger == LoggerConfig(kind="csv")


INVALID_OVERRIDES = [
    (("rope_scaling=linear", "rope_scaling.factor=0"), r"^rope_scaling\.factor: must be a finite positive number"),
    (("rope=alibi", "rope_scaling=yarn"), r"^rope_scaling\.type: 'yarn' scales rotary frequencies"),
    (("model.n_heads=3",), r"^model\.n_heads: d_model=128 is not divisible by n_heads=3"),
]
INVALID_IDS = ["scaling-factor-zero", "scaling-on-alibi", "heads-do-not-divide"]


@pytest.mark.parametrize("overrides, message", INVALID_OVERRIDES, ids=INVALID_IDS)
def test_invalid_override_raises_value_error_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_run(*overrides)


@pytest.mark.parametrize("overrides, message", INVALID_OVERRIDES, ids=INVALID_IDS)
def test_invalid_override_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run(*overrides)


# One source of truth: an option file states only what differs from the code; an experiment only what
# differs from the configuration it overlays.

GROUP_SCHEMAS = {"model": ModelConfig, "data": DataConfig, "tokenizer": TokenizerConfig, "optim": OptimConfig,
                 "trainer": TrainerConfig, "logger": LoggerConfig}
def schema_name(group: str, default: str) -> str:
    """'/schema/rope/alibi@_here_' -> 'alibi': the registered schema an option file extends."""
    assert default.startswith(f"/schema/{group}/") and default.endswith("@_here_"), default
    return default.removeprefix(f"/schema/{group}/").removesuffix("@_here_")


def schema_of(group: str, option: str):
    """The schema node an option file extends, with the code's defaults (the registry name's, for rope)."""
    if group in GROUP_SCHEMAS:
        return GROUP_SCHEMAS[group]()
    defaults = load_yaml(CONF / group / f"{option}.yaml").get("defaults")
    assert defaults and len(defaults) == 1, f"conf/{group}/{option}.yaml must name its schema"
    name = schema_name(group, defaults[0])
    if group == "rope":
        return POSITION_ENCODINGS[name](variant=name)
    if group == "positions":
        return POSITION_SAMPLERS[name]()
    return SCALINGS[name]()


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS if g != "experiment" for o in options(g)])
def test_option_files_restate_no_code_default(group, option):
    defaults = schema_of(group, option)
    restated = {k: v for k, v in leaves(load_yaml(CONF / group / f"{option}.yaml")).items()
                if getattr(defaults, k) == v}
    assert not restated, f"conf/{group}/{option}.yaml restates code defaults: {restated}"


EXPERIMENTS = options("experiment")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_restate_nothing_they_overlay(experiment):
    overlay = load_yaml(CONF / "experiment" / f"{experiment}.yaml")
    selections = [f"{k.removeprefix('override /')}={v}" for d in overlay.get("defaults", []) for k, v in d.items()]
    without = compose_run(*selections)  # the same option choices, none of the overlay's values
    restated = {k: v for k, v in leaves(overlay).items() if lookup(without, k) == v}
    assert not restated, f"conf/experiment/{experiment}.yaml restates values it already gets: {restated}"


def test_registries_match_the_option_files():
    """Every registered encoding and scaling has its YAML and every YAML names a registered schema
    (xpos is a preset of the complex layout)."""
    assert sorted([*POSITION_ENCODINGS, "xpos"]) == options("rope")
    assert sorted(SCALINGS) == options("rope_scaling")
    for group, registry in (("rope", POSITION_ENCODINGS), ("rope_scaling", SCALINGS)):
        for option in options(group):
            schema = schema_name(group, load_yaml(CONF / group / f"{option}.yaml")["defaults"][0])
            assert schema in registry and (schema == option or option == "xpos"), (group, option)


# ----------------------------------------------------------------------------------------------
# Resume continues the same run; failures are one line naming the culprit


def folder_state(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def alibi_run(tmp_path, env, cache_dir, small_corpus) -> Path:
    """A finished 6-step ALiBi run on the small corpus, CSV metrics."""
    run_dir = tmp_path / "alibi"
    assert_ok(small_run(env, cache_dir, run_dir, f"data.path={small_corpus}", "rope=alibi", "logger=csv",
                        "trainer.log_every_n_steps=1"))
    return run_dir


@pytest.mark.slow
def test_resume_restores_the_runs_configuration_and_tokenizer(alibi_run, env, cache_dir):
    """The README's resume command names no setting but the steps: the run goes on as it was (ALiBi, its data,
    its tokenizer), not with the defaults."""
    tokenizer = (alibi_run / "tokenizer.json").read_bytes()
    resumed = train(env, f"hydra.run.dir={alibi_run}", "ckpt_path=last", "trainer.max_steps=9",
                    f"data.cache_dir={cache_dir}")
    assert_ok(resumed)
    config = yaml.safe_load((alibi_run / "config.yaml").read_text())
    assert config["rope"]["variant"] == "alibi" and config["model"]["d_model"] == 32
    assert config["trainer"]["max_steps"] == 9 and config["tokenizer"]["path"] is None
    assert (alibi_run / "tokenizer.json").read_bytes() == tokenizer
    checkpoint = torch.load(alibi_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 9 and checkpoint["hyper_parameters"]["model"]["rope"]["variant"] == "alibi"


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("rope=complex", "error: rope.variant: the run was trained with 'alibi', this resume asks for 'complex'"),
    ("model.d_model=64", "error: model.d_model: the run was trained with 32, this resume asks for 64"),
    ("tokenizer.vocab_size=400", "error: tokenizer.vocab_size: the run was trained with 300, this resume asks for 400"),
])
def test_resume_that_contradicts_the_run_stops_and_changes_nothing(alibi_run, env, cache_dir, override, message):
    before = folder_state(alibi_run)
    result = small_run(env, cache_dir, alibi_run, "ckpt_path=last", "trainer.max_steps=9", override)
    assert result.rc == 2 and "Traceback" not in result.err
    assert result.err.strip().splitlines() == [next(line for line in result.err.splitlines() if line.startswith("error:"))]
    assert result.err.startswith(message), result.err
    assert folder_state(alibi_run) == {**before, "train.log": folder_state(alibi_run)["train.log"]}
    assert message in (alibi_run / "train.log").read_text()  # the run's log has the reason too


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_and_keeps_its_files(alibi_run, env, cache_dir):
    before = folder_state(alibi_run)
    result = train(env, f"hydra.run.dir={alibi_run}", "ckpt_path=last", f"data.cache_dir={cache_dir}")
    assert_ok(result)
    assert f"the run in {alibi_run} has already trained {MAX_STEPS} steps" in result.out
    assert {k: v for k, v in folder_state(alibi_run).items() if k != "train.log"} == \
           {k: v for k, v in before.items() if k != "train.log"}


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["best.ckpt", "step-000003.ckpt"])
def test_resume_from_any_checkpoint_numbers_steps_as_an_uninterrupted_run(checkpoint, tmp_path, env, cache_dir,
                                                                         small_corpus):
    """Rows of metrics.csv, and the W&B run, are those of one run whichever checkpoint it resumed from."""
    common = (f"data.path={small_corpus}", "trainer.log_every_n_steps=1", "logger.mode=offline")
    full, part = tmp_path / "full", tmp_path / "part"
    assert_ok(small_run(env, cache_dir, full, *common, "trainer.max_steps=9"))
    assert_ok(small_run(env, cache_dir, part, *common))
    assert_ok(small_run(env, cache_dir, part, *common, f"ckpt_path={part / 'checkpoints' / checkpoint}",
                        "trainer.max_steps=9"))

    def steps(run_dir: Path, key: str) -> list[int]:
        return [int(r["step"]) for r in metric_rows(run_dir) if key in r]

    assert steps(part, "train/loss") == steps(full, "train/loss") == list(range(9))
    assert steps(part, "val/loss") == steps(full, "val/loss") == [2, 5, 8]
    runs = sorted(p.name for p in (part / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[-1] for name in runs}) == 1  # one W&B run, resumed


@pytest.mark.slow
def test_job_folders_of_a_sweep_pass_back_unquoted(tmp_path, env, cache_dir, small_corpus):
    result = train(env, "-m", f"data.path={small_corpus}", *SMALL, "trainer.max_steps=3", "logger=csv",
                   f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={tmp_path}", "rope=alibi,none")
    assert_ok(result)
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(jobs) == 2 and [job.name[:2] for job in jobs] == ["0_", "1_"]  # long names: cut, with a hash
    assert not any(c in job.name for job in jobs for c in "=,[]'")
    resumed = train(env, f"hydra.run.dir={jobs[0]}", "ckpt_path=last", "trainer.max_steps=4",
                    f"data.cache_dir={cache_dir}")
    assert_ok(resumed)
    assert summary(jobs[0])["steps"] == 4


@pytest.fixture(scope="session")
def serial_sweep(shared, env) -> tuple[list[str], Path]:
    """Two small runs swept in turn by Hydra's basic launcher, once per session: what a parallel launcher's sweep
    (joblib here, submitit in test_scaleout) must train. The sweep's arguments, less its folder, and the folder."""
    arguments = ["-m", "data=synthetic", "data.task=copy", "rope=complex,alibi", *SMALL, "logger=csv"]
    done = SimpleNamespace(**once(shared, "serial_sweep", lambda folder: vars(
        train(env, *arguments, f"hydra.sweep.dir={folder / 'sweep'}"))))
    assert_ok(done)
    return arguments, shared / "serial_sweep" / "sweep"


@pytest.mark.slow
def test_parallel_sweep_trains_what_the_serial_one_does(tmp_path, env, serial_sweep):
    """make's JOBS: the joblib launcher's jobs train in worker processes, with the runs of a serial sweep."""
    sweep, serial_dir = serial_sweep
    parallel = train(env, *sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     f"hydra.sweep.dir={tmp_path / 'parallel'}")
    assert_ok(parallel)
    runs = {name: sorted(p.name for p in folder.iterdir() if p.is_dir())
            for name, folder in (("serial", serial_dir), ("parallel", tmp_path / "parallel"))}
    assert runs["serial"] == runs["parallel"] and len(runs["serial"]) == 2
    assert len(RESULT_LINE.findall(parallel.out)) == 2
    for run in runs["serial"]:
        serial, together = summary(serial_dir / run), summary(tmp_path / "parallel" / run)
        assert together["steps"] == serial["steps"] == MAX_STEPS
        assert together["val_loss"] == serial["val_loss"]  # the same seed, data and one thread: bitwise


FAILURES = {  # name: (arguments, the one line's start)
    "setting that is no setting": (["+trainer.max_step=20"],
                                   "error: trainer.max_step: not a setting of TrainerConfig (did you mean "
                                   "trainer.max_steps?)"),
    "another encoding's variant": (["rope.variant=alibi"], "error: rope.variant: got 'alibi', expected one of "
                                                           "['complex', 'interleaved', 'rotate_half']; alibi is an "
                                                           "encoding of its own: choose it with rope=alibi"),
    "missing relative data file": (["data.path=mydata.jsonl"], "error: data.path='mydata.jsonl': no such file"),
    "unknown synthetic task": (["data=synthetic", "data.task=sorting"],
                               "error: data.task: got 'sorting', expected one of ['copy', 'flipflop', 'mqar', 'needle']"),
    "synthetic window too short": (["data=synthetic", "data.task=mqar", "model.context_length=8"],
                                   "error: model.context_length: the mqar task needs sequences of at least 16 tokens"),
    "more pairs than keys": (["data=synthetic", "data.task=mqar", "data.tasks.mqar.num_keys=1"],
                             "error: data.tasks.mqar.num_keys: mqar at length 32 holds 2 pairs"),
    "contradictory task knobs": (["data=synthetic", "data.task=needle", "data.tasks.needle.depth=0.5"],
                                 "error: data.tasks.needle.depth: places a single needle; with "
                                 "data.tasks.needle.num_queries=4 leave it None"),
    "a task without synthetic data": (["data.task=copy"], "error: data.task: names a synthetic task, read only with "
                                                          "data=synthetic"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAILURES))
def test_a_failed_command_prints_one_line_and_leaves_no_empty_folder(case, tmp_path, env, cache_dir):
    args, message = FAILURES[case]
    result = small_run(env, cache_dir, tmp_path / "run", *args)
    assert result.rc == 2 and result.err.startswith(message), result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_gpu_trainer_without_a_gpu_is_one_line(tmp_path, env, cache_dir):
    result = small_run(env, cache_dir, tmp_path / "run", "trainer=gpu")
    assert result.rc == 2 and result.err.startswith("error: trainer.accelerator='gpu' with trainer.devices="), result.err
    assert len(result.err.strip().splitlines()) == 1


def test_help_lists_the_options_and_no_internal_names():
    done = subprocess.run([sys.executable, "scripts/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "  rope          alibi, complex*, cope, fire, fope, fox, interleaved, kerple" in done.stdout
    assert "schema" not in done.stdout
    done = subprocess.run([sys.executable, "scripts/eval_extrapolate.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "  logger        csv, none, wandb*" in done.stdout
    assert "\nrope" not in done.stdout  # eval offers no training groups


@pytest.mark.slow
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, env, cache_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    done = subprocess.run(["chattr", "+i", str(locked)], capture_output=True)  # refuses writes even to root
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder immutable here: {done.stderr.decode().strip()}")
    try:
        result = small_run(env, cache_dir, locked, "logger=none")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    assert result.err.strip() == f"error: hydra.run.dir={str(locked)!r}: the output folder cannot be written " \
                                 f"(Operation not permitted)"
