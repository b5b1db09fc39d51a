"""Run folders and checkpoints: the folder's layout, defined once; find runs, load them safely, each file read once."""

from __future__ import annotations

import glob
import json
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.registry import ConfigError, to_run_config

# What a reader of a run folder (an evaluation, a fine-tuning from it) takes from its config.yaml: which run it was
# and which documents it trained on and held out. Nothing else: where caches go (data.cache_dir) and all a command
# does are its command line's. The data a run names is read, never written: caches go under the reader's cache_dir.
READ_FROM_RUN = ("seed", "logger.group", "data.path", "data.name", "data.split", "data.val_split", "data.text_field",
                 "data.streaming", "data.max_documents", "data.val_fraction", "data.long_documents", "data.task",
                 "data.tasks")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not one of ours; the message names the file."""


class InFolder:
    """A path in a run folder, read as an attribute of it: RunFolder.summary = InFolder("summary.json") makes
    folder.summary the Path <folder>/summary.json."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, folder: Optional["RunFolder"], owner: type) -> "Path | InFolder":
        return self if folder is None else folder.path.joinpath(*self.parts)


class RunFolder:
    """A training run's folder as training writes it (train.py's hydra.run.dir):

        config.yaml       the run's settings, resolved (what a resume continues with)
        tokenizer.json    its tokenizer (a synthetic task's too)
        checkpoints/      best.ckpt (lowest val/loss), last.ckpt (the newest save), step-000150.ckpt, ...
        summary.json      what the run ended with (steps, tokens, losses, wall time)
        metrics.csv       one row per logged step (Lightning's CSV logger; hparams.yaml beside it is its too)
        init_from.json    a fine-tuning's source (a run's checkpoint and step; an import's path and architecture; checksums)
        val_loss.png      the validation curve
        train.log         the console's lines (Hydra's file handler)
        wandb/            W&B's own files; wandb/latest-run -> run-<time>-<id>

    Writers take each file's path from here and readers read through it: config.yaml is parsed once per object
    and kept, as a Run keeps what its checkpoint holds; the rest is read when asked (one caller each).

    A folder someone hands over is data, not instructions: config.yaml is plain values (a YAML tag, an
    interpolation or a _target_ key is refused), and what a reader takes from it is READ_FROM_RUN; cache_dir, the
    reader's own data.cache_dir, is where the run's documents are cached (None: DataConfig's default); a symbolic
    link among its files (link()) is refused by readers and writers alike."""

    CHECKPOINTS = "checkpoints"
    # Checkpoint file stems (Lightning's ModelCheckpoint filenames; each adds .ckpt).
    BEST = "best"
    LAST = "last"
    STEP = "step-{step:06d}"

    def __init__(self, path: str | Path, cache_dir: Optional[str] = None):
        self.path = Path(path)
        self.cache_dir = cache_dir
        self._settings: Optional[dict] = None

    @staticmethod
    def of_checkpoint(checkpoint: str | Path) -> "RunFolder":
        """The run folder of a checkpoint: <run>/checkpoints/x.ckpt -> <run> (a .ckpt elsewhere: its folder)."""
        checkpoint = Path(checkpoint)
        in_run = checkpoint.parent.name == RunFolder.CHECKPOINTS
        return RunFolder(checkpoint.parent.parent if in_run else checkpoint.parent)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def _key(self) -> tuple:
        return (self.path,)

    # ------------------------------------------------------------------------------------------
    # The layout

    @property
    def name(self) -> str:
        return self.path.name

    config = InFolder("config.yaml")
    tokenizer = InFolder("tokenizer.json")
    checkpoints = InFolder(CHECKPOINTS)
    best_checkpoint = InFolder(CHECKPOINTS, f"{BEST}.ckpt")
    last_checkpoint = InFolder(CHECKPOINTS, f"{LAST}.ckpt")
    summary = InFolder("summary.json")
    metrics = InFolder("metrics.csv")
    init_from = InFolder("init_from.json")
    curve_plot = InFolder("val_loss.png")
    log = InFolder("train.log")
    wandb = InFolder("wandb")

    def best_or_last(self) -> Optional[Path]:
        """best.ckpt (lowest validation loss) when there is one, else last.ckpt; None when neither is there."""
        for path in (self.best_checkpoint, self.last_checkpoint):
            if path.is_file():
                return path
        return None

    def refuse_links(self, culprit: str, rule: str) -> None:
        """ConfigError ('<culprit>: <link> is a symbolic link (to ...); <rule>: replace the link ...') where the
        folder or its checkpoints/ holds a symbolic link: what is read or written through one lies outside it."""
        entries = [*self.path.iterdir()] if self.path.is_dir() else []
        if self.checkpoints.is_dir() and not self.checkpoints.is_symlink():
            entries += [*self.checkpoints.iterdir()]
        for link in (entry for entry in entries if entry.is_symlink()):
            raise ConfigError(f"{culprit}: {link} is a symbolic link (to {link.readlink()}); {rule}: replace the "
                              f"link with the file it points to")

    def has_run_files(self) -> bool:
        """Whether config.yaml and tokenizer.json are here (a training run folder, not a loose checkpoint's)."""
        return self.config.is_file() and self.tokenizer.is_file()

    # ------------------------------------------------------------------------------------------
    # What the files say, each read once

    @property
    def settings(self) -> dict:
        """config.yaml as a plain dict, all of it ({} where the folder has none): what a resume of this run
        continues with. ConfigError naming the file unless it is plain values, as training writes it."""
        if self._settings is None:
            self._settings = read_settings(self.config) if self.config.is_file() else {}
        return self._settings

    def read_from_run(self, section: Optional[str] = None) -> dict:
        """The settings of READ_FROM_RUN that config.yaml holds (those of one section: "data", "logger")."""
        chosen: dict = {}
        for key in READ_FROM_RUN:
            parent, _, name = key.rpartition(".")  # one level of sections at most
            node = self.settings.get(parent) if parent else self.settings
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"{self.config}: {parent} must hold settings, got {node!r}")
            if node and name in node:
                (chosen.setdefault(parent, {}) if parent else chosen)[name] = node[name]
        return chosen if section is None else chosen.get(section, {})

    @property
    def seed(self) -> int:
        seed = self.read_from_run().get("seed")
        if type(seed) is not int:
            raise ConfigError(f"{self.config}: seed must be a whole number, got {seed!r}")
        return seed

    @property
    def wandb_group(self) -> Optional[str]:
        """The W&B group the run logged to (logger.group), None where it set none."""
        return self.read_from_run("logger").get("group")

    def data_config(self):
        """The DataConfig of the text the run trained on, as READ_FROM_RUN allows: its documents and split from
        config.yaml, its caches under self.cache_dir (the reader's), never where config.yaml says."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from minillm.data.config import DataConfig

        data = {k: v for k, v in self.read_from_run("data").items() if k not in ("task", "tasks")}
        try:
            config = to_run_config(OmegaConf.merge(OmegaConf.structured(DataConfig), data))
        except OmegaConfBaseException as error:  # a value of the wrong type
            raise ConfigError(f"{self.config}: data.{error.full_key}: {str(error).splitlines()[0]}") from error
        except ConfigError as error:  # DataConfig's own checks name the setting
            raise ConfigError(f"{self.config}: {error}") from error
        if self.cache_dir is not None:
            config.cache_dir = self.cache_dir
        return config

    @property
    def task(self):
        """The synthetic task the run learned (data.path=synthetic) as a TaskConfig with the run's knobs; None for
        a text run or a folder without config.yaml."""
        from minillm.data.config import SYNTHETIC
        from minillm.data.synthetic import task_config

        data = self.read_from_run("data")
        if data.get("path") != SYNTHETIC:
            return None
        name, tasks = data.get("task"), data.get("tasks") or {}
        if not isinstance(tasks, dict):
            raise ConfigError(f"{self.config}: data.tasks must hold each task's settings, got {tasks!r}")
        try:
            return task_config(name, tasks.get(name))
        except ValueError as error:
            raise ValueError(f"ckpt: {self.config}: {error}") from error

    def summary_values(self) -> dict:
        """summary.json's values ({} where the run wrote none)."""
        return json.loads(self.summary.read_text()) if self.summary.is_file() else {}

    def source_record(self) -> Optional[dict]:
        """A fine-tuning's init_from.json (its source as recorded), None where there is none."""
        return json.loads(self.init_from.read_text()) if self.init_from.is_file() else None

    def wandb_run_id(self) -> Optional[str]:
        """The id of the W&B run this folder logged to (W&B's own record, wandb/latest-run -> run-<time>-<id>)."""
        latest = self.wandb / "latest-run"
        if not latest.exists():
            return None
        return latest.resolve().name.rsplit("-", 1)[-1] or None


class Run(RunFolder):
    """A trained model on disk: one checkpoint of a run folder (what find_runs finds, an evaluation measures and a
    fine-tuning starts from). Its checkpoint is loaded once, on first use, and checked as load_checkpoint checks."""

    def __init__(self, checkpoint: str | Path, folder: str | Path, cache_dir: Optional[str] = None):
        super().__init__(folder, cache_dir)
        if self.config.is_file():  # a run folder, read as it is (a loose checkpoint's folder is no run's)
            self.refuse_links("ckpt", "a run folder is read as it is")
        self.checkpoint = Path(checkpoint)
        self._model_config: Optional[ModelConfig] = None
        self._weights: Optional[dict[str, torch.Tensor]] = None
        self._step = 0

    def __repr__(self) -> str:
        return f"Run({str(self.checkpoint)!r}, {str(self.path)!r})"

    def _key(self) -> tuple:
        return self.path, self.checkpoint

    @property
    def folder(self) -> Path:
        """The run folder's path (a loose checkpoint's: the folder it lies in)."""
        return self.path

    def _load(self) -> None:
        checkpoint = load_checkpoint(self.checkpoint)
        self._model_config = checkpoint_model_config(checkpoint, self.checkpoint)
        # Only what is read from here on is kept: the optimizer's state (twice the weights for AdamW) is not.
        self._weights = model_weights(checkpoint, self.checkpoint)
        self._step = int(checkpoint.get("global_step", 0))

    @property
    def model_config(self) -> ModelConfig:
        """The model config the checkpoint was trained with."""
        if self._model_config is None:
            self._load()
        return self._model_config

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The Transformer's weights (the checkpoint's "model." entries, without the prefix)."""
        if self._weights is None:
            self._load()
        return self._weights

    @property
    def step(self) -> int:
        """The training step the checkpoint was saved at."""
        if self._model_config is None:
            self._load()
        return self._step

    def load_model(self) -> Transformer:
        """The Transformer the checkpoint holds, in eval mode, on the CPU. The weights move into it: this object
        lets go of them (a second call reads the file again)."""
        model = build_model(self.model_config, self.weights, self.checkpoint)
        self._weights = None
        return model


def read_settings(path: Path) -> dict:
    """A run's config.yaml as a plain dict; ConfigError naming the file unless it is a mapping of plain values
    (training writes them resolved: a YAML tag, an interpolation or a _target_ key is no run's setting)."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as error:
        where = f"line {error.problem_mark.line + 1}: " if error.problem_mark is not None else ""
        tag = re.search(r"constructor for the tag '([^']+)'", str(error))
        problem = (f"the YAML tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')} would build an object; a "
                   f"run's settings are plain values") if tag else \
            f"not valid YAML ({error.problem or str(error).splitlines()[0]})"
        raise ConfigError(f"{path}: {where}{problem}") from error
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not a run's settings ({load_failure(error)})") from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: not a run's settings (a YAML list, not a mapping of settings)")
    for key, value in _entries(settings := OmegaConf.to_container(loaded, resolve=False)):
        if key.rsplit(".", 1)[-1] == "_target_":
            raise ConfigError(f"{path}: {key}={value!r} names an object to build; a run's settings are plain values")
        if isinstance(value, str) and "${" in value:
            raise ConfigError(f"{path}: {key}={value!r} is an interpolation; a run's settings are plain values")
    return settings


def _entries(node, prefix: str = ""):
    """(dotted key, value) of every entry of nested dicts and lists, outermost first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield f"{prefix}{key}", value
        yield from _entries(value, f"{prefix}{key}.")


def _natural_key(path: Path) -> list:
    """'2_rope=alibi' before '10_rope=xpos': Hydra numbers multirun jobs without padding."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_runs(path: str | Path, cache_dir: Optional[str] = None) -> list[Run]:
    """A .ckpt file, a run folder, or a folder of run folders (a multirun, one level deep) -> the runs in it;
    a glob pattern (`sweep/*rope-alibi__*`) -> the runs of every path it matches, in natural order.
    A run folder's checkpoint is checkpoints/best.ckpt, else checkpoints/last.ckpt. cache_dir: the reader's
    data.cache_dir, where the runs' documents are cached (RunFolder)."""
    if any(char in str(path) for char in "*?[") and not Path(path).expanduser().exists():
        matches = sorted(glob.glob(str(Path(path).expanduser())), key=lambda p: _natural_key(Path(p)))
        if not matches:
            raise CheckpointError(f"ckpt: nothing matches {path}")
        return [run for match in matches for run in find_runs(match, cache_dir)]
    path = Path(path).expanduser()
    if path.is_file():
        return [Run(path, RunFolder.of_checkpoint(path).path, cache_dir)]
    if not path.is_dir():
        raise CheckpointError(f"ckpt: {path} does not exist" if not path.exists() else
                              f"ckpt: {path} is neither a regular file nor a folder (a device or a pipe?): name a "
                              f".ckpt file, a run folder or a folder of runs")
    if (checkpoint := RunFolder(path).best_or_last()) is not None:
        return [Run(checkpoint, path, cache_dir)]
    runs = [Run(c, sub, cache_dir) for sub in sorted((p for p in path.iterdir() if p.is_dir()), key=_natural_key)
            if (c := RunFolder(sub).best_or_last()) is not None]
    if not runs:
        raise CheckpointError(f"ckpt: no checkpoints/{RunFolder.BEST}.ckpt or checkpoints/{RunFolder.LAST}.ckpt "
                              f"in {path} or in the folders inside it")
    return runs


def load_failure(error: Exception) -> str:
    """One line on why loading failed (torch.load's own messages run to a page)."""
    text = str(error)
    if (refused := re.search(r"Unsupported global: GLOBAL (\S+)", text)) is not None:
        return f"it holds a Python object that weights_only loading will not build: {refused.group(1)}"
    if "Weights only load failed" in text:
        operand = re.search(r"Unsupported operand \d+", text)
        return "not a pickle the safe unpickler can read" + (f": {operand.group(0)}" if operand else "")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0]  # miniz and friends add paragraphs of advice after the first sentence
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (a checkpoint someone hands you cannot run code), checked to be one of
    ours with finite weights (one that holds NaN or inf measures nothing, and trains no further)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling foreign bytes can raise nearly anything (KeyError, EOFError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a PyTorch checkpoint "
                              f"({load_failure(error)})") from error
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hyper_parameters, dict) or "model" not in hyper_parameters \
            or not isinstance(checkpoint.get("state_dict"), dict):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"checkpoint {path} was not written by minillm's training (expected state_dict and "
                              f"hyper_parameters.model; found {found})")
    if (problem := non_finite(checkpoint["state_dict"])) is not None:
        raise CheckpointError(f"checkpoint {path} holds weights that are not finite: {problem}")
    return checkpoint


def non_finite(tensors: dict) -> Optional[str]:
    """'<name> has N NaN and M infinite values of T' for the first tensor that is not all finite, else None."""
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and (tensor.is_floating_point() or tensor.is_complex()) \
                and not bool(torch.isfinite(tensor).all()):
            return (f"{name} has {int(torch.isnan(tensor).sum())} NaN and {int(torch.isinf(tensor).sum())} infinite "
                    f"values of {tensor.numel()}")
    return None


def checkpoint_model_config(checkpoint: dict, path: str | Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(checkpoint["hyper_parameters"]["model"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid model config: {load_failure(error)}") from error


def model_weights(checkpoint: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The Transformer's weights in a training checkpoint: its state_dict's "model." entries, without the prefix;
    a LoRA run's adapters (hyper_parameters.lora) merged into them, so that every reader sees one plain model."""
    prefix, lora = "model.", checkpoint["hyper_parameters"].get("lora")
    weights = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        return merge_adapters(weights, float(lora["alpha"]) / int(lora["rank"])) if lora else weights
    except (KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as error:
        raise CheckpointError(f"checkpoint {path}: its LoRA adapters do not merge ({load_failure(error)})") from error


# peft's layout of an adapted linear layer <name>: <name>.base_layer.weight (and .bias), the frozen layer, with
# <name>.lora_A.<adapter>.weight (r, in) and <name>.lora_B.<adapter>.weight (out, r).
LORA_A = re.compile(r"(.+)\.lora_A\.([^.]+)\.weight")


def merge_adapters(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """peft's adapted layers as plain ones under the model's own names: W' = W + scale·B·A, scale = alpha / r
    (Hu et al. 2021, arXiv:2106.09685, eq. 3 and sec. 4.1), computed in float32, stored in W's dtype."""
    plain = {k.replace(".base_layer.", "."): v for k, v in weights.items() if ".lora_" not in k}
    for name, a in weights.items():
        if (entry := LORA_A.fullmatch(name)) is not None:
            layer, adapter = entry.groups()
            b, base = weights[f"{layer}.lora_B.{adapter}.weight"], plain[f"{layer}.weight"]
            plain[f"{layer}.weight"] = (base.float() + scale * (b.float() @ a.float())).to(base.dtype)
    return plain


def build_model(cfg: ModelConfig, weights: dict[str, torch.Tensor], path: str | Path) -> Transformer:
    """The Transformer of a checkpoint's config and weights, in eval mode, on the CPU; path: the checkpoint, for
    the messages."""
    try:
        model = Transformer(cfg)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid model config: {load_failure(error)}") from error
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # "Error(s) in loading state_dict ...", then one line per problem
        problems = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        raise CheckpointError(f"checkpoint {path}: the weights do not fit the model its config describes "
                              f"({problems[:400] or load_failure(error)})") from error
    return model.eval()


def load_model(path: str | Path) -> Transformer:
    """Rebuild the Transformer stored in a training checkpoint, in eval mode, on the CPU."""
    checkpoint = load_checkpoint(path)
    return build_model(checkpoint_model_config(checkpoint, path), model_weights(checkpoint, path), path)
