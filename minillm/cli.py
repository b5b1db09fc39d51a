"""The command line: Hydra's schemas and resolvers (--help is minillm.help, which needs none of them)."""

from __future__ import annotations

import hashlib
import re


def folder_name(override_dirname: str, limit: int = 200) -> str:
    """Hydra's override_dirname as one folder name that a command line can pass back unquoted
    (hydra.run.dir=<job folder>, ckpt=<job folder>): 'rope=alibi,seed=1' -> 'rope-alibi__seed-1'. '/' in a value
    would nest folders and '=', ',' or brackets would need quoting; a name over the file systems' 255-byte
    limit cannot be created, so long names keep a hash for uniqueness."""
    name = re.sub(r"[^\w.+\-]", "_", override_dirname.replace(",", "__").replace("=", "-"))
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name.encode()[:limit - 9].decode(errors='ignore')}-{digest}"


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (conf/ YAML files extend them and never restate defaults), and
    the resolvers the YAML uses (folder names, the default folders' unique suffix). The schemas' modules import torch: imported here, when a command
    composes its config, so that importing this module (and --help, before it) stays instant."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from minillm.console import unique_suffix
    from minillm.eval.config import EvalConfig
    from minillm.positions.base import POSITION_ENCODINGS
    from minillm.positions.samplers import POSITION_SAMPLERS
    from minillm.positions.scaling import SCALINGS
    from minillm.train.config import RunConfig

    if not OmegaConf.has_resolver("folder_name"):
        OmegaConf.register_new_resolver("folder_name", folder_name)
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", unique_suffix, use_cache=True)  # one value per run

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="eval_schema", node=EvalConfig)
    # One schema per registered name, derived from its class: conf/rope/<name>.yaml extends /schema/rope/<name>.
    # Their own group, so that rope= offers the YAML files only.
    for name, cls in POSITION_ENCODINGS.items():
        store.store(group="schema/rope", name=name, node=cls(variant=name))
    for name, cls in SCALINGS.items():
        store.store(group="schema/rope_scaling", name=name, node=cls)
    for name, cls in POSITION_SAMPLERS.items():
        store.store(group="schema/positions", name=name, node=cls)
