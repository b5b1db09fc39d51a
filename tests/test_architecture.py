"""The package's rooms and the way imports go between them, read from the source (AST), as the folder READMEs state.

Leaves import nothing of the package; positions/ only leaves; model/ positions and leaves; data/ leaves; train/ and
eval/ never each other; only cli.py imports everything. No underscore name crosses a room.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minillm"

LEAVES = {"registry", "kernels", "files", "console", "precision", "help"}
# room -> the rooms it may import (besides itself)
ALLOWED = {
    **{leaf: set() for leaf in LEAVES},
    "tracking": LEAVES,
    "positions": LEAVES,
    "model": {"positions"} | LEAVES,
    "data": LEAVES,
    "runs": {"model", "positions", "data"} | LEAVES,
    "interop": {"model", "positions", "runs"} | LEAVES,
    "train": {"positions", "model", "data", "runs", "interop", "tracking"} | LEAVES,
    "eval": {"positions", "model", "data", "runs", "interop", "tracking"} | LEAVES,
    "cli": {"positions", "model", "data", "runs", "interop", "tracking", "train", "eval"} | LEAVES,
}
# The public names from before the rooms (minillm.rope.RotaryEmbedding, ...): each re-exports one room, and no
# module of the package imports them.
COMPAT = {"rope": "positions", "scaling": "positions", "export": "interop", "pretrained": "interop"}


def room_of(module: str) -> str:
    """'minillm.positions.rotary' -> 'positions'; 'minillm.kernels' -> 'kernels'; 'minillm' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(package: Path):
    """(importing module, imported module, imported name or None, line) for every import of the package's own
    modules, at any depth (imports inside functions count too)."""
    for path in sorted(package.rglob("*.py")):
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] == package.name:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}" if node.module == package.name else node.module
                    yield module, target, alias.name, node.lineno
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package.name:
                        yield module, alias.name, None, node.lineno


def violations(package: Path) -> list[str]:
    """Every import that breaks the rules, one line each naming the file, the line and the rule."""
    found = []
    for module, target, name, line in imports(package):
        source, dest = room_of(module), room_of(target)
        where = f"{module} (line {line}) imports {target}"
        if dest in COMPAT and source not in COMPAT:
            found.append(f"{where}: {dest} only keeps old public names; import minillm.{COMPAT[dest]} instead")
            continue
        if source in COMPAT:
            if dest not in (source, COMPAT[source]):
                found.append(f"{where}: minillm.{source} re-exports minillm.{COMPAT[source]} only")
            continue
        if source == dest or source == "":
            continue
        if source not in ALLOWED:
            found.append(f"{where}: {source} is no room of the architecture (add it to the rules and its README)")
        elif dest not in ALLOWED[source]:
            found.append(f"{where}: {source} may import only {sorted(ALLOWED[source]) or 'nothing of the package'}")
        elif name is not None and name.startswith("_"):
            found.append(f"{where}: {name} is private to {dest}")
    return found


def test_every_import_goes_the_way_the_rooms_allow():
    assert violations(PACKAGE) == []


def test_every_module_belongs_to_a_room_with_a_readme():
    rooms = {room_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    rooms.discard("__init__")
    assert rooms <= set(ALLOWED) | set(COMPAT)
    for folder in (p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert (folder / "README.md").is_file(), f"{folder.name}/ has no README.md"


def test_each_module_states_its_one_job_and_stays_small():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.name != "__init__.py" or tree.body:
            assert ast.get_docstring(tree), f"{path.relative_to(PACKAGE)} has no docstring"
        assert len(path.read_text().splitlines()) <= 450, f"{path.relative_to(PACKAGE)} is over 450 lines"


@pytest.mark.parametrize("source, line, rule", [
    ("minillm/positions/bad.py", "from minillm.model.config import ModelConfig", "positions may import only"),
    ("minillm/kernels.py", "from minillm.positions.base import Positions", "nothing of the package"),
    ("minillm/train/bad.py", "from minillm.eval.loop import evaluate", "train may import only"),
    ("minillm/eval/bad.py", "import minillm.train.run", "eval may import only"),
    ("minillm/eval/bad.py", "    from minillm.cli import register_configs", "eval may import only"),
    ("minillm/model/bad.py", "from minillm.positions.base import _private", "_private is private to positions"),
    ("minillm/eval/bad.py", "from minillm.rope import Positions", "only keeps old public names"),
    ("minillm/model/bad.py", "from minillm import data", "model may import only"),
])
def test_the_rules_catch_a_violation(tmp_path, source, line, rule):
    """The checker fails on each kind of wrong import (one planted in an otherwise empty copy of the layout)."""
    package = tmp_path / "minillm"
    for folder in ("positions", "model", "train", "eval", "data"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    path = tmp_path / source
    body = f"def f():\n{line}\n" if line.startswith(" ") else f"{line}\n"
    path.write_text(f'"""A module that breaks a rule."""\n{body}')
    found = violations(package)
    assert len(found) == 1 and rule in found[0] and source.split("/")[-1].removesuffix(".py") in found[0]


def test_the_public_names_from_before_the_rooms_still_import():
    from minillm.export import to_hf_llama
    from minillm.interop.export import to_hf_llama as exported
    from minillm.positions.base import Positions as BasePositions
    from minillm.positions.rotary import RotaryEmbedding as Rotary
    from minillm.pretrained import load_pretrained
    from minillm.rope import Positions, RotaryEmbedding
    from minillm.scaling import LinearScaling, Llama3Scaling, NTKScaling, Scaling, YarnScaling  # noqa: F401

    assert (Positions, RotaryEmbedding, to_hf_llama) == (BasePositions, Rotary, exported)
    assert load_pretrained.__module__ == "minillm.interop.pretrained"


@pytest.mark.slow
def test_the_evaluation_path_imports_neither_lightning_nor_wandb(tmp_path):
    """A user's evaluation of a text run with the CSV logger: Lightning (and torchmetrics behind it) and W&B are
    not imported at all (-X importtime lists every module the command imported)."""
    import subprocess
    import sys

    text = " ".join(f"word{i % 37} and some more prose number {i}." for i in range(3000))
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"d{i}.txt").write_text(text[i * 1000:] + text[:i * 1000])
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "scripts/train.py", f"data.path={tmp_path / 'docs'}", "data.val_fraction=0.34",
             "tokenizer.vocab_size=300", "model.context_length=32", "model.d_model=32", "model.n_layers=1",
             "model.n_heads=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
             f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(train, cwd=PACKAGE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    evaluate = [sys.executable, "-X", "importtime", "scripts/eval_extrapolate.py", f"ckpt={tmp_path / 'run'}",
                "lengths=[32,64]", "scalings=[none,yarn]", "passkey_trials=0", "logger=csv",
                f"hydra.run.dir={tmp_path / 'eval'}"]
    done = subprocess.run(evaluate, cwd=PACKAGE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "minillm.eval.loop" in imported and "torch" in imported  # the listing is the evaluation's own
    assert not {name for name in imported if name.split(".")[0] in ("lightning", "wandb", "torchmetrics")}


def test_help_reads_the_source_and_imports_no_heavy_library():
    """minillm.help answers --help before anything heavy is imported: from the source (ast) and conf/, with the
    standard library and PyYAML only (no torch, Hydra or OmegaConf), and nothing of the package."""
    tree = ast.parse((PACKAGE / "help.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert modules - set(sys.stdlib_module_names) == {"yaml"}
