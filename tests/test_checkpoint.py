"""Finding runs and loading checkpoints safely: every bad file becomes a CheckpointError naming it."""

from __future__ import annotations

import collections
import os
import pickle
import re

import pytest
import torch

from minillm.runs import CheckpointError, Run, find_runs, load_checkpoint, load_model
from minillm.model.transformer import Transformer

from test_eval_script import tiny_runs  # noqa: F401  (the session's trained runs, shared with the script tests)


def make_run(folder, *names: str):
    (folder / "checkpoints").mkdir(parents=True)
    for name in names:
        (folder / "checkpoints" / name).write_bytes(b"")
    return folder


class NotAllowed:  # a class torch.load(weights_only=True) refuses to build
    pass


# ----------------------------------------------------------------------------------------------
# find_runs


def test_find_runs_on_a_checkpoint_file(tmp_path):
    run = make_run(tmp_path / "run", "last.ckpt", "step-000010.ckpt")
    assert find_runs(run / "checkpoints" / "step-000010.ckpt") == [Run(run / "checkpoints" / "step-000010.ckpt", run)]
    (tmp_path / "loose.ckpt").write_bytes(b"")
    assert find_runs(tmp_path / "loose.ckpt") == [Run(tmp_path / "loose.ckpt", tmp_path)]


def test_find_runs_on_a_run_folder_prefers_the_best_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", "last.ckpt", "best.ckpt")
    [found] = find_runs(run)
    assert found.checkpoint == run / "checkpoints" / "best.ckpt" and found.folder == run
    assert found.name == "run" and found.config == run / "config.yaml" and found.tokenizer == run / "tokenizer.json"
    only_last = make_run(tmp_path / "other", "last.ckpt")
    assert find_runs(only_last)[0].checkpoint == only_last / "checkpoints" / "last.ckpt"


def test_find_runs_on_a_multirun_folder_in_job_order(tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("10_rope=xpos", "2_rope=alibi", "0_rope=complex"):
        make_run(sweep / name, "last.ckpt")
    (sweep / ".submitit").mkdir()  # folders without checkpoints are not runs
    (sweep / "multirun.yaml").write_text("")
    assert [run.name for run in find_runs(sweep)] == ["0_rope=complex", "2_rope=alibi", "10_rope=xpos"]


def test_find_runs_refuses_an_empty_folder_and_a_missing_path(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = re.escape(f"no checkpoints/best.ckpt or checkpoints/last.ckpt in {tmp_path / 'empty'}")
    with pytest.raises(CheckpointError, match=empty):
        find_runs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=re.escape(f"ckpt: {tmp_path / 'missing'} does not exist")):
        find_runs(tmp_path / "missing")
    assert issubclass(CheckpointError, ValueError)  # the scripts turn it into exit status 2


# ----------------------------------------------------------------------------------------------
# load_checkpoint / load_model on bad files


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


BAD_FILES = {
    "empty": lambda p: _write(p, b""),
    "random_bytes": lambda p: _write(p, os.urandom(4096)),
    "text": lambda p: _write(p, b"not a checkpoint\n"),
    "plain_pickle": lambda p: _write(p, pickle.dumps({"state_dict": {}}, protocol=4)),
    "disallowed_object": lambda p: torch.save({"state_dict": {}, "hyper_parameters": {"model": NotAllowed()}}, p),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_unreadable_files_are_refused(kind, tmp_path):
    path = BAD_FILES[kind](tmp_path / f"{kind}.ckpt") or tmp_path / f"{kind}.ckpt"
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} is corrupt, truncated or not a PyTorch checkpoint (")
    assert "\n" not in message and len(message) < 400
    if kind == "disallowed_object":
        assert "NotAllowed" in message


@pytest.mark.parametrize("content", [{"weights": torch.ones(2)}, collections.OrderedDict(w=torch.ones(2)),
                                     [torch.ones(2)], torch.ones(2),
                                     {"state_dict": {}, "hyper_parameters": {"lr": 1e-3}},
                                     {"state_dict": [1], "hyper_parameters": {"model": {}}}],
                         ids=["dict", "state_dict", "list", "tensor", "other_lightning_module", "odd_state_dict"])
def test_foreign_torch_files_are_refused(content, tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} was not written by minillm's training")):
        load_checkpoint(path)


def test_missing_and_folder_paths_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------
# Real checkpoints from scripts/train.py


@pytest.mark.slow
def test_real_checkpoints_load_with_weights_only(tiny_runs):  # noqa: F811
    for variant in ("complex", "alibi", "learned"):
        for name in ("best.ckpt", "last.ckpt"):
            path = tiny_runs[variant] / "checkpoints" / name
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
            assert checkpoint["hyper_parameters"]["model"]["rope"]["variant"] == variant
            model = load_model(path)
            assert isinstance(model, Transformer) and not model.training
            assert model.cfg.context_length == 32 and model.cfg.rope.variant == variant
            state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
            for key, value in model.state_dict().items():
                assert torch.equal(value, state[key]), key
            with torch.inference_mode():
                logits = model(torch.zeros(1, 8, dtype=torch.long))
            assert logits.shape == (1, 8, model.cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_truncated_real_checkpoint_is_refused(tiny_runs, tmp_path):  # noqa: F811
    data = (tiny_runs["complex"] / "checkpoints" / "last.ckpt").read_bytes()
    path = _write(tmp_path / "truncated.ckpt", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {path} is corrupt, truncated")):
        load_model(path)


@pytest.mark.slow
def test_weights_that_do_not_fit_the_config_are_refused(tiny_runs, tmp_path):  # noqa: F811
    checkpoint = torch.load(tiny_runs["complex"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    shapes = dict(checkpoint, state_dict={**checkpoint["state_dict"], "model.embed.weight": torch.zeros(5, 32)})
    torch.save(shapes, tmp_path / "shapes.ckpt")
    pattern = re.escape(f"checkpoint {tmp_path / 'shapes.ckpt'}: the weights do not fit") + r".*size mismatch for embed"
    with pytest.raises(CheckpointError, match=pattern):
        load_model(tmp_path / "shapes.ckpt")

    missing = dict(checkpoint, state_dict={k: v for k, v in checkpoint["state_dict"].items() if "ffn" not in k})
    torch.save(missing, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="the weights do not fit .*Missing key"):
        load_model(tmp_path / "missing.ckpt")

    config = dict(checkpoint, hyper_parameters={"model": {**checkpoint["hyper_parameters"]["model"], "n_heads": 5}})
    torch.save(config, tmp_path / "config.ckpt")
    pattern = re.escape(f"checkpoint {tmp_path / 'config.ckpt'} holds an invalid model config")
    with pytest.raises(CheckpointError, match=pattern):
        load_model(tmp_path / "config.ckpt")



def test_find_runs_expands_a_glob_in_natural_order(tmp_path):
    for name in ("0_rope-alibi__seed-0", "2_rope-alibi__seed-1", "10_rope-alibi__seed-2", "1_rope-complex__seed-0"):
        (tmp_path / "sweep" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "sweep" / name / "checkpoints" / "last.ckpt").write_bytes(b"")
    runs = find_runs(tmp_path / "sweep" / "*rope-alibi__*")
    assert [run.name for run in runs] == ["0_rope-alibi__seed-0", "2_rope-alibi__seed-1", "10_rope-alibi__seed-2"]
    with pytest.raises(CheckpointError, match=r"ckpt: nothing matches .*\*rope-xpos__\*"):
        find_runs(tmp_path / "sweep" / "*rope-xpos__*")
