"""Resuming: the saved configuration wins, resumable overrides apply, contradictions and non-settings are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from minillm.registry import ConfigError
from minillm.train.config import RunConfig
from minillm.cli import folder_name, register_configs
from minillm.registry import to_run_config
from minillm.runs import RunFolder
from minillm.train.resume import override_keys, resumed, run_config, unknown_settings

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def saved_run(*overrides: str):
    """A run's config.yaml as training writes it."""
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(to_run_config(composed(*overrides)))))


def test_override_keys():
    assert override_keys(["trainer.max_steps=9", "+a.b=1", "~c", "rope=alibi", "hydra.run.dir=x",
                          "model@m=small"]) == ["trainer.max_steps", "a.b", "c", "rope", "model"]


@pytest.mark.parametrize("override, message", [
    ("+trainer.max_step=20", r"^trainer\.max_step: not a setting of TrainerConfig \(did you mean trainer\.max_steps\?\)"),
    ("+rope.thetta=5", r"^rope\.thetta: not a setting of RotaryConfig \(did you mean rope\.theta\?\)"),
    ("+zzz=1", r"^zzz: not a setting of RunConfig; it has \["),
])
def test_keys_that_are_no_setting_are_named(override, message):
    import re

    (first,) = unknown_settings(composed(override))
    assert re.match(message, first), first


def test_every_composed_setting_is_known():
    assert unknown_settings(composed()) == []
    assert unknown_settings(composed("rope=alibi", "rope_scaling=none", "experiment=extrapolation")) == []


def test_resume_keeps_the_runs_settings_and_applies_resumable_overrides():
    saved = saved_run("rope=alibi", "data.path=train.jsonl", "model.d_model=64")
    cfg = composed("trainer.max_steps=2000", "logger=csv", "ckpt_path=last")
    merged = resumed(cfg, saved, ["trainer.max_steps=2000", "logger=csv", "ckpt_path=last"],
                     OmegaConf.structured(RunConfig))
    run = run_config(OmegaConf.to_container(merged))
    assert run.rope.variant == "alibi" and run.data.path == "train.jsonl" and run.model.d_model == 64
    assert run.trainer.max_steps == 2000 and run.logger.kind == "csv" and run.ckpt_path == "last"


@pytest.mark.parametrize("overrides, message", [
    (["rope=complex"], r"^rope\.variant: the run was trained with 'alibi', this resume asks for 'complex'"),
    (["model.d_model=128"], r"^model\.d_model: the run was trained with 64, this resume asks for 128"),
    (["data.path=other.jsonl"], r"^data\.path: the run was trained with 'train\.jsonl', this resume asks for 'other"),
    (["seed=3"], r"^seed: the run was trained with 0, this resume asks for 3"),
])
def test_resume_refuses_a_contradicting_override(overrides, message):
    saved = saved_run("rope=alibi", "data.path=train.jsonl", "model.d_model=64")
    with pytest.raises(ConfigError, match=message):
        resumed(composed(*overrides), saved, overrides, OmegaConf.structured(RunConfig))
    # the same values as the run's are fine
    same = ["rope=alibi", "model.d_model=64", "data.path=train.jsonl"]
    resumed(composed(*same), saved, same, OmegaConf.structured(RunConfig))


def test_run_folder_and_wandb_id(tmp_path):
    assert RunFolder.of_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt").path == tmp_path / "run"
    assert RunFolder(tmp_path).wandb_run_id() is None
    (tmp_path / "wandb" / "offline-run-20261201_120000-abc123").mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to("offline-run-20261201_120000-abc123")
    assert RunFolder(tmp_path).wandb_run_id() == "abc123"


@pytest.mark.parametrize("dirname", ["rope=alibi,seed=1", "data.path=/x/y.jsonl,logger.tags=[a,b]",
                                     "trainer.max_steps=10," + "rope.theta=500000," * 30])
def test_job_folder_names_pass_back_unquoted(dirname):
    name = folder_name(dirname)
    assert "/" not in name and len(name.encode()) <= 200
    override = OverridesParser.create().parse_override(f"hydra.run.dir=multirun/2026-12-01/0_{name}")
    assert override.value() == f"multirun/2026-12-01/0_{name}"
    assert folder_name("rope=alibi,seed=1") == "rope-alibi__seed-1"


def test_a_folder_whose_run_finished_is_not_taken_for_a_dead_start(tmp_path):
    """config.yaml without a checkpoint is a start killed before its first save, unless summary.json says the
    run finished (its checkpoints pruned): a new run there would overwrite its config and metrics."""
    from minillm.train.resume import configure

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    configure(composed(), run_dir)  # a dead start: taken over
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"already holds a run"):
        configure(composed(), run_dir)
