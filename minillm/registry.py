"""Settings plumbing shared by every part: the check that names a setting, the unknown-field check, ConfigError."""

from __future__ import annotations

import dataclasses


class ConfigError(ValueError):
    """A configuration that composed but does not make sense; the message names the setting."""


def require(condition: bool, name: str, message: str) -> None:
    """Raise ValueError("name: message") unless condition: every check names the setting it refuses."""
    if not condition:
        raise ValueError(f"{name}: {message}")


def choice(value: str, name: str, allowed) -> None:
    require(value in allowed, name, f"got {value!r}, expected one of {sorted(allowed)}")


def known_fields(cls: type, d: dict, prefix: str) -> dict:
    """d itself, after checking that every key is a field of the dataclass cls."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    require(not unknown, f"{prefix}.{unknown[0] if unknown else ''}",
            f"not a setting of {cls.__name__} (it has {sorted(names)})")
    return d


def to_run_config(cfg):
    """Hydra's tree (a DictConfig) -> the validated dataclasses (each __post_init__ checks its own fields)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:  # our ValueError may arrive wrapped; unwrap it for a clean message
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(str(error.__cause__).splitlines()[0]) from error
        # OmegaConf's own (e.g. "Interpolation key 'x' not found") names the setting on a later line: lead with it.
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}" if key else str(error).splitlines()[0]) from error
    except ValueError as error:  # a dataclass's __post_init__ check, raised as is: it names the setting
        raise ConfigError(str(error).splitlines()[0]) from error
