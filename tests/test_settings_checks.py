"""Every setting is checked when its config is built: NaN and ±inf refused in every float field of every config
class (the cases generated from the dataclasses and the registries, so a new member is covered), the seed's and
Lightning's ranges refused before Lightning sees them, each named by its command-line name in one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from minillm.data.config import DataConfig, TokenizerConfig
from minillm.data.synthetic import SYNTHETIC_TASKS, task_config
from minillm.eval.config import EvalConfig
from minillm.model.config import ModelConfig
from minillm.positions.base import POSITION_ENCODINGS, position_config
from minillm.positions.methods import ATTENTION_METHODS, attention_method
from minillm.positions.rotary import MultiAxisRotary, RotaryEmbedding
from minillm.positions.samplers import POSITION_SAMPLERS, sampler_config
from minillm.positions.scaling import SCALINGS, scaling_config
from minillm.registry import ConfigError, finite, to_run_config
from minillm.tracking import LoggerConfig
from minillm.train.config import SEED_MAX, OptimConfig, RunConfig, TrainerConfig

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def config_builders() -> dict[str, tuple[str, type, typing.Callable[[dict], object]]]:
    """Every config class a command line reaches, by a test id: the prefix its settings have there (model.norm_eps,
    rope.theta, methods.leaky_rerope.k, data.tasks.mqar.power_a; "" for the scripts' top-level settings), the
    class, and a builder from a dict of settings."""
    flat = {"model": ModelConfig, "optim": OptimConfig, "trainer": TrainerConfig, "data": DataConfig,
            "tokenizer": TokenizerConfig, "logger": LoggerConfig}
    builders = {key: (key, cls, lambda d, cls=cls: cls(**d)) for key, cls in flat.items()}
    builders["train"] = ("", RunConfig, lambda d: RunConfig(**d))
    builders["eval"] = ("", EvalConfig, lambda d: EvalConfig(**{"ckpt": "run", **d}))
    for name, cls in POSITION_ENCODINGS.items():
        builders[f"rope[{name}]"] = ("rope", cls, lambda d, name=name: position_config({"variant": name, **d}))
    for name, cls in SCALINGS.items():
        builders[f"rope_scaling[{name}]"] = ("rope_scaling", cls,
                                            lambda d, name=name: scaling_config({"type": name, **d}))
    for name, cls in POSITION_SAMPLERS.items():
        builders[f"positions[{name}]"] = ("positions", cls, lambda d, name=name: sampler_config({"sampler": name, **d}))
    for name, cls in ATTENTION_METHODS.items():
        builders[f"methods.{name}"] = (f"methods.{name}", cls, lambda d, name=name: attention_method(name, d))
    for name, cls in SYNTHETIC_TASKS.items():
        builders[f"data.tasks.{name}"] = (f"data.tasks.{name}", cls, lambda d, name=name: task_config(name, d))
    return builders


def takes_float(hint) -> bool:
    """Whether a field's type admits a float: float, Optional[float], Union[int, float], list[float], ..."""
    return hint is float or any(takes_float(arg) for arg in typing.get_args(hint))


# A setting checked together with another: its partner's valid value, so that the check under test speaks.
PARTNERS = {"mscale": {"mscale_all_dim": 1.0}, "mscale_all_dim": {"mscale": 1.0}}


def float_cases() -> list:
    cases = []
    for key, (prefix, cls, build) in config_builders().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if not takes_float(hint):
                continue
            listed = list in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint)))
            name = f"{prefix}.{f.name}" if prefix else f.name
            for bad in (NAN, INF, -INF):
                value = [1.0, bad] if listed else bad
                cases.append(pytest.param(build, f.name, value, name, id=f"{key}.{f.name}={value}"))
    return cases


FLOAT_CASES = float_cases()


def test_the_float_cases_cover_every_part():
    names = {case.values[3] for case in FLOAT_CASES}
    assert {"model.norm_eps", "model.init_std", "optim.lr", "optim.eps", "trainer.gradient_clip_val",
            "trainer.limit_val_batches", "data.val_fraction", "rope.theta", "rope.xpos_scale_base", "rope.max_period",
            "rope_scaling.factor", "rope_scaling.short_factor", "methods.leaky_rerope.k",
            "data.tasks.mqar.power_a", "data.tasks.flipflop.p_read", "scaling_factor", "passkey_depths"} <= names


@pytest.mark.parametrize("build, field, value, name", FLOAT_CASES)
def test_a_non_finite_float_setting_is_refused_naming_it(build, field, value, name):
    with pytest.raises(ValueError) as error:
        build({field: value, **PARTNERS.get(field, {})})
    message = str(error.value)
    assert message.startswith(f"{name}: ") and "\n" not in message, message
    assert str(value) in message, message  # what was given is shown


def test_finite_names_a_top_level_setting_by_itself_and_checks_lists():
    @dataclasses.dataclass
    class Settings:
        scale: float = 1.0
        depths: list = dataclasses.field(default_factory=lambda: [0.5])

    with pytest.raises(ValueError, match=r"^scale: must be a finite number, got inf$"):
        finite(Settings(scale=INF), "")
    with pytest.raises(ValueError, match=r"^eval[.]depths: must hold finite numbers, got \[0[.]5, nan\]$"):
        finite(Settings(depths=[0.5, NAN]), "eval")
    finite(Settings(), "")


@pytest.mark.parametrize("key", sorted(config_builders()))
def test_every_config_builds_from_its_defaults(key):
    """So that the refusals above are the values', not the classes'."""
    _, cls, build = config_builders()[key]
    assert isinstance(build({}), cls)


# ----------------------------------------------------------------------------------------------
# Ranges that reached a library before and came back in its words


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1])
def test_seed_outside_numpys_range_is_refused_naming_seed(seed):
    with pytest.raises(ValueError, match=rf"^seed: must be in \[0, {SEED_MAX}\].*got {seed}$"):
        RunConfig(seed=seed)


@pytest.mark.parametrize("seed", [0, SEED_MAX])
def test_seed_at_numpys_bounds_builds(seed):
    assert RunConfig(seed=seed).seed == seed


@pytest.mark.parametrize("limit", [-3, 0, 1.5, -0.5, True])
def test_limit_val_batches_outside_lightnings_range_is_refused_naming_it(limit):
    with pytest.raises(ValueError, match=r"^trainer\.limit_val_batches: must be a positive number of batches or a "
                                         r"fraction in \(0, 1\]"):
        TrainerConfig(limit_val_batches=limit)


@pytest.mark.parametrize("limit", [None, 1, 40, 0.25, 1.0])
def test_limit_val_batches_counts_and_fractions_build(limit):
    assert TrainerConfig(limit_val_batches=limit).limit_val_batches == limit


def test_an_unregistered_strategy_is_refused_naming_it_and_listing_lightnings():
    with pytest.raises(ValueError, match=r"^trainer\.strategy: got 'banana', expected one of \[.*'auto'.*'ddp'"):
        TrainerConfig(strategy="banana")
    assert TrainerConfig(strategy="ddp_spawn").strategy == "ddp_spawn"


@pytest.mark.parametrize("kwargs, name", [
    (dict(eps=NAN), "optim.eps"), (dict(eps=0.0), "optim.eps"), (dict(lr=INF), "optim.lr"),
    (dict(weight_decay=INF), "optim.weight_decay"),
])
def test_optimizer_settings_torch_would_refuse_or_diverge_on_are_named(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name.replace('.', '[.]')}: must be a finite"):
        OptimConfig(**kwargs)


def test_theta_inf_says_finite_positive():
    with pytest.raises(ValueError, match=r"^rope\.theta: must be a finite positive number, got inf$"):
        position_config({"variant": "complex", "theta": INF})


# ----------------------------------------------------------------------------------------------
# The issue's commands, composed as scripts/train.py composes them


ISSUE_COMMANDS = {
    "model.norm_eps=inf": "model.norm_eps: must be a finite positive number, got inf",
    "optim.lr=inf": "optim.lr: must be a finite positive number, got inf",
    "model.init_std=inf": "model.init_std: must be a finite positive number, got inf",
    "rope=xpos rope.xpos_scale_base=inf": "rope.xpos_scale_base: must be a finite positive number, got inf",
    "seed=-1": f"seed: must be in [0, {SEED_MAX}] (what numpy seeds), got -1",
    "optim.eps=nan": "optim.eps: must be a finite positive number, got nan",
    "trainer.limit_val_batches=-3": "trainer.limit_val_batches: must be a positive number of batches or a fraction "
                                    "in (0, 1], got -3",
    "trainer.strategy=banana": "trainer.strategy: got 'banana', expected one of ['auto', 'ddp', ",
    "rope.theta=inf": "rope.theta: must be a finite positive number, got inf",
}


@pytest.fixture(scope="module")
def compose_run():
    from hydra import compose, initialize_config_dir

    from minillm.cli import register_configs

    register_configs()

    def composed(overrides: list[str]):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose("config", overrides=overrides)

    return composed


@pytest.mark.parametrize("command", sorted(ISSUE_COMMANDS))
def test_the_issues_commands_are_refused_at_start_naming_the_setting(compose_run, command):
    with pytest.raises(ConfigError) as error:
        to_run_config(compose_run(command.split()))
    assert str(error.value).startswith(ISSUE_COMMANDS[command]) and "\n" not in str(error.value), str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["model.norm_eps=inf", "rope=xpos rope.xpos_scale_base=inf",
                                     "trainer.strategy=banana"])
def test_train_script_refuses_the_setting_in_one_line_with_exit_2(tmp_path, command):
    """Before: norm_eps=inf trained a constant predictor with rc 0; the XPos base a 77-line OverflowError; the
    strategy was blamed on trainer.accelerator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "scripts/train.py", "data=synthetic", "data.task=copy", "logger=csv",
                           "trainer.max_steps=2", *command.split(), f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ISSUE_COMMANDS[command]}"), done.stderr[-3000:]
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("build, name", [
    (lambda: RotaryEmbedding(8, theta=INF), "theta"),
    (lambda: RotaryEmbedding(8, xpos_scale_base=INF), "xpos_scale_base"),
    (lambda: MultiAxisRotary([4], theta=NAN), "theta"),
])
def test_the_rotary_modules_refuse_a_non_finite_base_too(build, name):
    """The library's own constructors (minillm.rope) hold to the configs' ranges: inf would turn no channel."""
    with pytest.raises(ValueError, match=rf"^{name}: must be a finite positive number"):
        build()
