"""Resuming a run: its saved configuration, the settings a resume may change, and settings that are not settings."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from minillm.console import rank_zero
from minillm.model.config import ModelConfig, ModelSettings
from minillm.registry import ConfigError, to_run_config
from minillm.runs import RunFolder
from minillm.train.config import RunConfig

# What a resumed run may change: how long it trains and how it reports. Everything else (shape, encoding,
# data, tokenizer, optimiser, seed) is the run's own, read from its config.yaml.
RESUMABLE = ("trainer.max_steps", "trainer.val_check_interval", "trainer.limit_val_batches",
             "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.max_bad_steps",
             "trainer.compile", "trainer.peak_flops", "data.num_workers", "data.cache_dir", "logger", "ckpt_path",
             "verbose")
DERIVED = ("model.vocab_size", "model.rope", "model.rope_scaling")  # set from the tokenizer and the groups
GLOBAL_GROUPS = ("experiment",)  # overlays on the whole tree (`# @package _global_`)
# Filled in by a new run where the command line leaves them unset (a fine-tuning's scaling takes its source's
# length, minillm.train.finetune): asked again unset on resume, they match whatever the run filled in.
FILLED = ("rope_scaling.original_max_position",)


def _resumable(key: str) -> bool:
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The settings command-line overrides name: 'trainer.max_steps=9' -> 'trainer.max_steps', '+a.b=1' -> 'a.b'
    ('~a.b' deletes a.b); Hydra's own (hydra.*) left out."""
    keys = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key and not key.startswith("hydra.") and key != "hydra":
            keys.append(key.split("@", 1)[0])  # group@package=option: the group
    return keys


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], node


def unknown_settings(cfg: DictConfig) -> list[str]:
    """Keys of cfg that no dataclass in the tree declares (a `+key=value` for a key that is no setting, a typo
    in an experiment), each with a close match where there is one."""
    found = []

    def walk(node: DictConfig, prefix: str) -> None:
        cls = OmegaConf.get_type(node)
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
        for key in node.keys():
            path = f"{prefix}{key}"
            if fields is not None and key not in fields:
                close = difflib.get_close_matches(str(key), sorted(fields), n=1)
                found.append(f"{path}: not a setting of {cls.__name__}"
                             + (f" (did you mean {prefix}{close[0]}?)" if close else f"; it has {sorted(fields)}"))
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{path}.")

    walk(cfg, "")
    return found


def _as_plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def resumed(cfg: DictConfig, saved: DictConfig, overrides: Sequence[str], defaults: DictConfig) -> DictConfig:
    """The run's saved configuration with the resumable overrides of cfg applied. An override that would change
    anything else, and differs from the run's value, raises ConfigError naming it, the run's value and the asked one.

    defaults: the code's defaults, to tell what a global overlay (experiment=...) sets from what it leaves.
    """
    merged = OmegaConf.create(OmegaConf.to_container(saved, resolve=True))
    saved_leaves = dict(_leaves(OmegaConf.to_container(saved, resolve=True)))
    for key in override_keys(overrides):
        if _resumable(key):
            OmegaConf.update(merged, key, _as_plain(OmegaConf.select(cfg, key)), merge=False, force_add=True)
            continue
        if key in GLOBAL_GROUPS:  # compare what the overlay sets, leaf by leaf
            base = dict(_leaves(OmegaConf.to_container(defaults, resolve=True)))
            leaves = {k: v for k, v in _leaves(OmegaConf.to_container(cfg, resolve=True)) if base.get(k) != v}
        else:
            leaves = dict(_leaves(_as_plain(OmegaConf.select(cfg, key)), f"{key}."))
        for setting, value in leaves.items():
            if _resumable(setting) or any(setting == d or setting.startswith(d + ".") for d in DERIVED):
                continue
            if value is None and setting in FILLED:
                continue
            if saved_leaves.get(setting) != value:
                raise ConfigError(f"{setting}: the run was trained with {saved_leaves.get(setting)!r}, this resume "
                                  f"asks for {value!r}; a resumed run keeps its settings (it may change "
                                  f"{', '.join(r for r in RESUMABLE if r not in ('ckpt_path', 'verbose'))}); start a new "
                                  f"run to train another")
    return merged


def run_config(saved: dict) -> RunConfig:
    """A RunConfig from a run's saved config.yaml contents (the top-level rope groups carry the encoding)."""
    values = dict(saved)
    model = {k: v for k, v in values.pop("model", {}).items() if k not in ("rope", "rope_scaling")}
    kwargs: dict[str, Any] = {"model": ModelSettings(**model)}
    for f in dataclasses.fields(RunConfig):
        if f.name in values and f.name != "model":
            value = values.pop(f.name)
            nested = f.default_factory is not dataclasses.MISSING  # a config class of its own (data, trainer, ...)
            kwargs[f.name] = f.default_factory(**value) if nested else value
    if values:
        raise ConfigError(f"{sorted(values)[0]}: not a setting of RunConfig (in the run's config.yaml)")
    try:
        return RunConfig(**kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error).splitlines()[0]) from error


@dataclass
class Resume:
    """Where a run continues: the checkpoint, and the step and model it holds."""

    checkpoint: str
    step: int
    model: ModelConfig

    def check_model(self, model: ModelConfig) -> None:
        """Raise, naming the field, unless `model` is the one the checkpoint's weights belong to (loading them
        into another fails deep inside Lightning with a page of size mismatches)."""
        for f in dataclasses.fields(ModelConfig):
            if getattr(self.model, f.name) != getattr(model, f.name):
                raise ConfigError(f"model.{f.name}: the checkpoint {self.checkpoint} holds a model with "
                                  f"{getattr(self.model, f.name)!r}, the run's config.yaml and tokenizer give "
                                  f"{getattr(model, f.name)!r}")


def has_checkpoint(folder: RunFolder) -> bool:
    """Whether the run folder holds a checkpoint: from then on it is a run (a failure keeps it; it resumes)."""
    return any(folder.checkpoints.glob("*.ckpt"))


def resolve_checkpoint(ckpt_path: Optional[str], run_dir: Path) -> Optional[tuple[str, dict]]:
    """ckpt_path -> (the checkpoint's path, its contents): 'last' -> this run folder's last checkpoint; a run
    folder -> its last; a file -> itself; None -> None. A corrupt one fails here, naming the newest checkpoint
    beside it that does load."""
    from minillm.runs import CheckpointError, load_checkpoint
    from minillm.train.checkpoints import last_good_checkpoint

    if ckpt_path is None:
        return None
    path = run_dir if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if path.is_dir():
        path = RunFolder(path).last_checkpoint
    if path.exists() and not path.is_file():
        raise ConfigError(f"ckpt_path: {path} is not a regular file (a device or a pipe?): name a .ckpt file or a "
                          f"run folder")
    if not path.is_file():
        if ckpt_path == "last" and RunFolder(run_dir).config.is_file():  # a start killed before its first save
            raise ConfigError(f"ckpt_path: no checkpoint at {path}: the run in {run_dir} stopped before its first "
                              f"checkpoint, so there is nothing to resume; start it afresh there (the same command "
                              f"without ckpt_path)")
        raise ConfigError(f"ckpt_path: no checkpoint at {path} (to resume a run, start it again in its folder: "
                          f"hydra.run.dir=<run folder> ckpt_path=last)")
    try:
        return str(path), load_checkpoint(path)
    except CheckpointError as error:
        good = last_good_checkpoint(path.parent, skip=path)
        hint = (f"the newest checkpoint that loads is {good[0]} (step {good[1]}): resume from it with "
                f"ckpt_path={good[0]}" if good else f"no other checkpoint in {path.parent} loads")
        raise CheckpointError(f"ckpt_path: {error}; {hint}") from error


def configure(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> tuple[RunConfig, dict, Optional[Resume]]:
    """The run to train, its config.yaml contents, and where it resumes (None: a new run).

    A resume continues the run the checkpoint belongs to: its config.yaml, with only the resumable command-line
    overrides (steps, cadence, logging) applied; one that contradicts the run raises, naming the setting. A new
    run is refused a folder that already holds one."""

    unknown = unknown_settings(cfg)
    if unknown:
        raise ConfigError(unknown[0])
    run = to_run_config(cfg)
    found = resolve_checkpoint(run.ckpt_path, run_dir)  # before the data: a wrong path fails at once
    if found is None:
        # A config.yaml without a checkpoint is a start killed before its first save (this process holds the
        # folder, so its writer is gone): nothing to resume, and a new run takes the folder.
        folder = RunFolder(run_dir)
        taken = has_checkpoint(folder) or folder.summary.is_file()  # summary: a run that finished
        if taken and rank_zero():  # DDP's other ranks find rank 0's files
            raise ConfigError(f"hydra.run.dir={str(run_dir)!r}: already holds a run (config.yaml, checkpoints); "
                              f"continue it with ckpt_path=last, or train a new one in another folder")
        return run, OmegaConf.to_container(OmegaConf.structured(run)), None
    ckpt_path, checkpoint = found
    source = RunFolder.of_checkpoint(ckpt_path)
    source.refuse_links("ckpt_path", "a run folder is read as it is")  # what a resume reads stays inside it
    if not source.has_run_files():
        raise ConfigError(f"ckpt_path: {source.path} lacks config.yaml or tokenizer.json, so the run it continues "
                          f"is unknown (a checkpoint is resumed from its training run folder)")
    merged = resumed(cfg, OmegaConf.create(source.settings), overrides, OmegaConf.structured(RunConfig))
    # Caches go where this command line says (or the default), never where the folder's config.yaml points.
    OmegaConf.update(merged, "data.cache_dir", cfg.data.cache_dir, merge=False)
    resumed_run = run_config(OmegaConf.to_container(merged))
    # The run's own tokenizer, whatever tokenizer.path says: the checkpoint's vocabulary is its.
    resumed_run.tokenizer = dataclasses.replace(resumed_run.tokenizer, path=str(source.tokenizer))
    resume = Resume(ckpt_path, int(checkpoint.get("global_step", 0)),
                    ModelConfig.from_dict(checkpoint["hyper_parameters"]["model"]))
    return resumed_run, OmegaConf.to_container(merged), resume
