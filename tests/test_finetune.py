"""minillm.finetune and init_from= end to end: a new run starts from a source's weights, keeps its shape and
tokenizer, trains at its own length and scaling with a fresh optimizer, and never touches the source."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from minillm.runs import load_checkpoint, load_model
from minillm.model.config import ModelConfig
from minillm.train.config import RunConfig
from minillm.train.loggers import run_tags
from minillm.positions.scaling import LinearScaling

REPO = Path(__file__).resolve().parents[1]
SOURCE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context_length=32", "data.batch_size=8",
          "trainer.val_check_interval=50", "trainer.checkpoint_every_n_steps=50", "data.val_windows=4",
          "tokenizer.vocab_size=300", "logger=csv", "optim.lr=3e-3", "optim.warmup_steps=10",
          "trainer.precision=32-true"]  # the same numbers on every processor (auto picks bf16 where it is native)
SOURCE_STEPS = 150


def script(env: dict, name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.getbasetemp().parent / "finetune_home"
    home.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**clean, "HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def source(tmp_path_factory, env) -> Path:
    """A 32-token complex-RoPE run of 150 steps, trained once per session (xdist workers share it)."""
    root = tmp_path_factory.getbasetemp().parent / "finetune_source"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "lock")):
        if not (root / "done").exists():
            result = script(env, "train.py", *SOURCE, f"trainer.max_steps={SOURCE_STEPS}",
                            f"data.cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}")
            assert result.returncode == 0, result.stderr[-3000:]
            (root / "done").touch()
    return root / "run"


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def finetune(env, source, out, *args) -> subprocess.CompletedProcess:
    return script(env, "train.py", f"init_from={source}", "logger=csv", "data.batch_size=8", "data.val_windows=4",
                  f"data.cache_dir={source.parent / 'cache'}", f"hydra.run.dir={out}", *args)


@pytest.mark.slow
def test_init_from_starts_from_the_source_with_a_fresh_optimizer(env, source, tmp_path):
    before = digest(source)
    out = tmp_path / "tuned"
    result = finetune(env, source, out, "model.context_length=64", "rope_scaling=linear", "rope_scaling.factor=2",
                      "trainer.max_steps=1", "trainer.val_check_interval=1", "optim.warmup_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert digest(source) == before  # the source run, checkpoints included, is untouched

    tuned = load_checkpoint(out / "checkpoints" / "last.ckpt")
    original = load_checkpoint(source / "checkpoints" / "best.ckpt")
    model = tuned["hyper_parameters"]["model"]
    assert model["context_length"] == 64 and model["d_model"] == 32 and model["vocab_size"] == 300
    assert model["rope_scaling"] == {**model["rope_scaling"], "type": "linear", "factor": 2.0, "original_max_position": 32}
    # One AdamW step from the source's weights moves each by about lr (its first update is lr·sign(g)), plus decay.
    lr = tuned["hyper_parameters"]["optim"]["lr"]
    gaps = [float((tuned["state_dict"][k] - v).abs().max()) for k, v in original["state_dict"].items()]
    assert max(gaps) <= 1.2 * lr and max(gaps) > 0
    steps = {int(s["step"]) for s in tuned["optimizer_states"][0]["state"].values()}
    assert steps == {1}  # a fresh optimizer: the source's state had SOURCE_STEPS steps
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    recorded = json.loads((out / "summary.json").read_text())["init_from_source"]
    assert recorded["sha256"] == hashlib.sha256((source / "checkpoints" / "best.ckpt").read_bytes()).hexdigest()
    assert recorded["step"] == SOURCE_STEPS and recorded["context_length"] == 32
    assert json.loads((out / "init_from.json").read_text()) == recorded

    resumed = finetune(env, source, out, "model.context_length=64", "rope_scaling=linear", "rope_scaling.factor=2",
                       "trainer.max_steps=3", "trainer.val_check_interval=1", "optim.warmup_steps=1", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("case", ["shape", "encoding", "missing", "corrupt", "not_a_checkpoint", "vocabulary"])
def test_bad_sources_and_contradicting_overrides_exit_naming_them(case, env, source, tmp_path):
    """One line naming the setting or file, exit 2, and no run folder left with anything in it."""
    init_from, extra = source, []
    if case == "shape":
        extra, message = ["model.d_model=64"], "error: model.d_model: init_from="
    elif case == "encoding":
        extra, message = ["rope=alibi"], "error: rope.variant: init_from="
    elif case == "missing":
        init_from, message = tmp_path / "absent", f"error: init_from: {tmp_path / 'absent'} does not exist"
    elif case == "corrupt":
        init_from = tmp_path / "bad.ckpt"
        init_from.write_bytes((source / "checkpoints" / "best.ckpt").read_bytes()[:5000])
        message = f"error: init_from: checkpoint {init_from} is corrupt, truncated"
    elif case == "not_a_checkpoint":
        init_from = tmp_path / "notes.ckpt"
        init_from.write_text(json.dumps({"hello": 1}))
        message = f"error: init_from: checkpoint {init_from} is corrupt"
    else:  # another vocabulary: a tokenizer with one token more
        other = tmp_path / "other.json"
        text = json.loads((source / "tokenizer.json").read_text())
        text["model"]["vocab"]["zzzz_extra"] = len(text["model"]["vocab"])
        other.write_text(json.dumps(text))
        extra, message = [f"tokenizer.path={other}"], f"error: tokenizer.path={str(other)!r}: not the tokenizer"
    if case in ("corrupt", "not_a_checkpoint"):  # a checkpoint outside a run folder needs its tokenizer beside
        (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    out = tmp_path / "run"
    result = finetune(env, init_from, out, "trainer.max_steps=1", *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(p.suffix != ".log" for p in out.iterdir())


def test_a_sampler_an_encoding_cannot_take_is_refused_at_config_time():
    """NoPE reads no positions: a sampler on it is refused at config time, naming positions.sampler."""
    with pytest.raises(ValueError, match="positions.sampler"):
        RunConfig(rope={"variant": "none"}, positions={"sampler": "randomized", "max_position": 512})


def test_fine_tunings_are_tagged_with_their_method():
    run = RunConfig(rope_scaling=LinearScaling(factor=4.0), positions={"sampler": "pose", "target_length": 1024},
                    init_from="outputs/x", model=ModelConfig(context_length=256))
    tags = run_tags(run)
    assert {"scaling=linear", "positions=pose", "finetuned"} <= set(tags)


@pytest.mark.slow
def test_fine_tuned_pi_beats_pi_at_inference_only_at_4x(env, source, tmp_path):
    """The protocol PI's paper uses (Chen et al. 2023, arXiv:2306.15595): interpolate, then fine-tune briefly.
    Measured at 4x the source's length, the fine-tuned model is better than the source with PI applied
    at inference alone, on the same validation tokens."""
    out = tmp_path / "pi"
    result = finetune(env, source, out, "model.context_length=128", "rope_scaling=linear", "rope_scaling.factor=4",
                      "trainer.max_steps=40", "trainer.val_check_interval=40", "optim.lr=1e-3", "optim.warmup_steps=5",
                      "trainer.precision=32-true")
    assert result.returncode == 0, result.stderr[-3000:]
    from minillm.eval.config import EvalConfig
    from minillm.eval.loop import evaluate_run
    from minillm.eval.perplexity import PerplexityRecord
    from minillm.runs import find_runs

    config = EvalConfig(ckpt=str(source), lengths=[128], scalings=["linear"], passkey_trials=0, tail_loss=False,
                           max_documents=4, precision="float32")
    cache = str(source.parent / "cache")  # the evaluation's own data.cache_dir (a run folder's is never read)
    inference_only = evaluate_run(find_runs(source, cache)[0], config, torch.device("cpu")).of(PerplexityRecord)[0]
    config = EvalConfig(ckpt=str(out), lengths=[128], scalings=["none"], passkey_trials=0, tail_loss=False,
                           max_documents=4, precision="float32")
    tuned = evaluate_run(find_runs(out, cache)[0], config, torch.device("cpu")).of(PerplexityRecord)[0]
    assert inference_only.setting.factor == 4.0 and load_model(out / "checkpoints" / "last.ckpt").cfg.rope_scaling.factor == 4
    assert tuned.tokens == inference_only.tokens
    assert tuned.ppl < 0.95 * inference_only.ppl, (tuned.ppl, inference_only.ppl)


@pytest.mark.slow
def test_a_pose_fine_tuning_resumed_mid_run_ends_where_an_uninterrupted_one_does(env, source, tmp_path):
    """PoSE's positions come from (seed, step, rank): resumed from its step-2 checkpoint in another folder, a run
    trains the same steps on the same positions and ends with the same weights, bit for bit."""
    common = ["rope_scaling=yarn", "rope_scaling.factor=4", "positions=pose", "model.context_length=32",
              "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=2"]
    whole = finetune(env, source, tmp_path / "whole", *common)
    assert whole.returncode == 0, whole.stderr[-3000:]
    step_2 = tmp_path / "whole" / "checkpoints" / "step-000002.ckpt"
    resumed = finetune(env, source, tmp_path / "resumed", *common, f"ckpt_path={step_2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    positions = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")["hyper_parameters"]["positions"]
    assert positions == {"sampler": "pose", "chunks": 2, "target_length": 128}  # resolved: 32 × 4


def test_load_weights_gives_the_source_weights_exactly(source):
    from minillm.train.finetune import load_source, load_weights
    from minillm.model.transformer import Transformer

    loaded = load_source(str(source))
    model = Transformer(loaded.model)
    load_weights(model, loaded)
    original = load_checkpoint(source / "checkpoints" / "best.ckpt")["state_dict"]
    assert all(torch.equal(model.state_dict()[k.removeprefix("model.")], v) for k, v in original.items())
    assert loaded.group() == source.name  # the source logged without a group: its folder names the group


def test_a_fine_tuning_keeps_its_sources_norm_eps(source, tmp_path):
    """norm_eps is the source's (its weights were trained with it): taken when unnamed, refused when named otherwise."""
    from minillm.model.config import ModelSettings
    from minillm.registry import ConfigError
    from minillm.train.finetune import from_source, load_source

    loaded = load_source(str(source))
    run = RunConfig(init_from=str(source), model=ModelSettings(norm_eps=1e-3))
    assert from_source(run, loaded, [], tmp_path / "tokenizer.json").model.norm_eps == loaded.model.norm_eps == 1e-5
    with pytest.raises(ConfigError, match=r"^model\.norm_eps: init_from=.* holds a model with 1e-05, this run asks"):
        from_source(run, loaded, ["model.norm_eps=1e-3"], tmp_path / "tokenizer.json")
