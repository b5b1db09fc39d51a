"""--help (minillm.help): every setting of the scripts' config trees in one row with its field comment, the options
of every group, no derived copies, exit 0, and neither torch nor Hydra imported to print it."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.data.synthetic import SYNTHETIC_TASKS
from minillm.eval.config import EvalConfig
from minillm.help import UNDOCUMENTED, answer_help, help_text
from minillm.positions.base import POSITION_ENCODINGS
from minillm.positions.methods import ATTENTION_METHODS
from minillm.positions.samplers import POSITION_SAMPLERS
from minillm.positions.scaling import SCALINGS
from minillm.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
GROUP_REGISTRIES = {"rope": POSITION_ENCODINGS, "rope_scaling": SCALINGS, "positions": POSITION_SAMPLERS}
NESTED_REGISTRIES = {"data.tasks": SYNTHETIC_TASKS, "methods": ATTENTION_METHODS}


def settings(cls: type, prefix: str = "") -> dict[str, list[tuple[type, str]]]:
    """Every key=value setting of a config class -> the (class, field) pairs declaring it (several where options
    share a key: rope_scaling.factor), from the classes themselves (not their source): nested configs, the
    registries' option classes (rope.<field>, ...) and the per-member settings (data.tasks.<task>.<knob>)."""
    keys: dict[str, list[tuple[type, str]]] = {}
    for item in dataclasses.fields(cls):
        key = f"{prefix}{item.name}"
        if key in GROUP_REGISTRIES:
            registry = GROUP_REGISTRIES[key]
            for member in dict.fromkeys(registry.values()):
                own = [n for n, c in registry.items() if c is member]
                for f in dataclasses.fields(member):
                    if not (f.name == registry.field and len(own) == 1):
                        keys.setdefault(f"{key}.{f.name}", []).append((member, f.name))
        elif key in NESTED_REGISTRIES:
            for name, member in NESTED_REGISTRIES[key].items():
                keys.update({f"{key}.{name}.{f.name}": [(member, f.name)] for f in dataclasses.fields(member)})
        elif item.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(item.default_factory):
            keys.update(settings(item.default_factory, f"{key}."))
        else:
            keys[key] = [(cls, item.name)]
    return dict(sorted(keys.items()))


def trailing_comment(cls: type, name: str) -> str | None:
    """The comment at the end of the line declaring field `name` in cls (or a base), if there is one there."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            match = re.search(rf"^    {name}: [^#\n]*#\s*(.+)$", inspect.getsource(klass), re.MULTILINE)
            return " ".join(match.group(1).split()) if match else None
    return None


def rows(text: str) -> dict[str, str]:
    """Every row of the help with its continuation lines: settings (`key=default [type] ...`) by key, options
    (`group=option ...`) by `group=option`."""
    found, key = {}, None
    for line in text.splitlines():
        first = line.strip().split(" ", 1)[0]
        name = first.split("=")[0].replace(".", "").replace("_", "")
        if line.startswith(" ") and not line.startswith(" " * 30) and "=" in first and name.isalnum():
            key = first.split("=")[0] if " [" in line else first
            found[key] = line.strip()
        elif key is not None and line.startswith(" " * 30) and line.strip():
            found[key] += " " + line.strip()
        else:
            key = None
    return found


def run_help(script: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", script, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def imported(importtime: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    return {line.split("|")[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}


def test_train_help_describes_every_setting_in_one_row_and_exits_0():
    done = run_help("scripts/train.py", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    shown = rows(done.stdout)
    expected = settings(RunConfig)
    assert {"data.tasks.copy.num_symbols", "rope.theta", "rope_scaling.beta_fast", "positions.chunks"} <= set(expected)
    assert [key for key in expected if key not in shown] == []
    assert {key: row for key, row in shown.items() if UNDOCUMENTED in row} == {}
    # the field comment is the row's description (the trailing ones checked here, read by another route)
    described = {(key, cls.__name__): trailing_comment(cls, name) for key, wheres in expected.items()
                 for cls, name in wheres}
    assert len([c for c in described.values() if c]) > 60
    text = " ".join(done.stdout.split())  # a setting several options share has a row under each that defines it
    assert {key: comment for key, comment in described.items() if comment and comment not in text} == {}
    # a chosen option's values are shown with it
    assert shown["trainer.val_check_interval"].startswith("trainer.val_check_interval=100 ")
    assert "steps between validations" in shown["trainer.val_check_interval"]
    assert shown["model.context_length"].startswith("model.context_length=256 ")
    assert "model=small" in shown and "context_length=512" in shown["model=small"]
    assert "rope=xpos" in shown and "xpos_scale_base=512" in shown["rope=xpos"]
    assert "rope=complex *" in done.stdout and "model=tiny *" in done.stdout
    # the model's encoding has one slot, the rope and rope_scaling groups: no derived model.rope copy
    assert "model.rope" not in done.stdout


def test_eval_help_describes_every_setting_and_offers_no_training_group():
    done = run_help("scripts/eval_extrapolate.py", "-h")
    assert done.returncode == 0, done.stderr[-2000:]
    shown = rows(done.stdout)
    expected = settings(EvalConfig)
    assert "methods.self_extend.group" in expected and "logger.kind" in expected
    assert [key for key in expected if key not in shown] == []
    assert {key: row for key, row in shown.items() if UNDOCUMENTED in row} == {}
    described = {key: trailing_comment(*wheres[0]) for key, wheres in expected.items()}
    assert {key: shown[key] for key, comment in described.items() if comment and comment not in shown[key]} == {}
    assert "  logger        csv, none, wandb*" in done.stdout
    assert not any(key.startswith(("rope", "model", "trainer", "optim")) for key in shown)


@pytest.mark.parametrize("script", ["scripts/train.py", "scripts/eval_extrapolate.py"])
def test_help_imports_neither_torch_nor_the_schemas(script):
    """What makes help instant: the scripts answer it before the schemas (and torch) are imported."""
    done = run_help(script, "--help")
    assert done.returncode == 0
    modules = imported(done.stderr)
    assert "minillm.help" in modules
    assert not {m for m in modules if m.split(".")[0] in ("torch", "lightning") or m.startswith("minillm.train")}


def test_help_module_imports_nothing_heavy():
    code = ("import sys\nfrom minillm.help import answer_help\nanswer_help('train', ['rope=alibi'])\n"
            "try:\n    answer_help('eval', ['ckpt=x', '--help'])\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'hydra', 'omegaconf'))\n"
            "print(code, heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"


def test_answer_help_returns_without_a_help_flag(capsys):
    answer_help("train", ["rope=alibi", "trainer.max_steps=5"])
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit) as exit_:
        answer_help("train", ["-h"])
    assert exit_.value.code == 0 and "rope.theta=10000.0" in capsys.readouterr().out


def test_help_fits_the_width_it_is_given():
    for width in (80, 100, 120):
        lines = help_text("train", width).splitlines() + help_text("eval", width).splitlines()
        # a line may overflow only by one word too long to break (a path)
        assert [line for line in lines if len(line.rstrip().rsplit(" ", 1)[0]) > width] == []
