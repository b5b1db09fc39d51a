"""Settings plumbing shared by every part: the checks that name a setting (finite numbers among them), the
unknown-field check, ConfigError, and the Registry each axis (encodings, scalings, attention methods, samplers,
tasks) keeps its classes in."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Callable, Mapping, Optional, TypeVar

T = TypeVar("T", bound=type)


class ConfigError(ValueError):
    """A configuration that composed but does not make sense; the message names the setting."""


def require(condition: bool, name: str, message: str) -> None:
    """Raise ValueError("name: message") unless condition: every check names the setting it refuses."""
    if not condition:
        raise ValueError(f"{name}: {message}")


def choice(value: str, name: str, allowed) -> None:
    require(value in allowed, name, f"got {value!r}, expected one of {sorted(allowed)}")


def positive(value: float, name: str) -> None:
    """Refuse anything but a finite number above 0, naming the setting: inf passes `value > 0`, and an infinite
    step size, epsilon or base trains to nonsense instead of failing."""
    require(math.isfinite(value) and value > 0, name, f"must be a finite positive number, got {value}")


def finite(config, prefix: str, declared_by: Optional[type] = None) -> None:
    """Refuse NaN and ±inf in the float fields (and lists of floats) of the dataclass instance `config`, naming
    `prefix`.field (the field alone for a top-level config, prefix ""): range checks alone let inf through
    (inf > 0) and NaN makes every comparison false.

    Called at the end of a __post_init__, after the range checks (which say more); declared_by: check only the
    fields of that dataclass (the caller's class, in a hierarchy whose subclasses check theirs after it), else all.
    """
    for f in dataclasses.fields(declared_by or config):
        value, name = getattr(config, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(value, Sequence) and not isinstance(value, str):
            require(all(math.isfinite(v) for v in value if isinstance(v, float)), name,
                    f"must hold finite numbers, got {list(value)}")
        elif isinstance(value, float):
            require(math.isfinite(value), name, f"must be a finite number, got {value}")


def known_fields(cls: type, d: dict, prefix: str, member: Optional[str] = None) -> dict:
    """d itself, after checking that every key is a field of the dataclass cls (member: how the message names
    cls; its class name by default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    require(not unknown, f"{prefix}.{unknown[0] if unknown else ''}",
            f"not a setting of {member or cls.__name__} (it has {sorted(names)})")
    return d


class Registry(dict):
    """The config classes of one axis by the names one setting chooses them by, e.g. Registry("rope.variant").

    A dict in registration order (`name in R`, `R[name]`, `R.items()`); the order is the reports' order.
    Adding a member means one class under `@R.register("name")` and one YAML named after it.

    field: the config field that holds the name (variant, type, sampler), so a plain dict says its class and
    `build` fills it in; None where the name is given beside the settings (attention methods, tasks).
    default: the name a dict without `field` gets. names_class: set `cls.name` to the first registered name
    (False where several names share one class and the field tells them apart: the rotary layouts).
    unknown, member: the wording of the unknown-name and the unknown-field errors ({name}, {choices}).
    """

    def __init__(self, setting: str, field: Optional[str] = None, default: Optional[str] = None, *,
                 names_class: bool = True, unknown: str = "got {name!r}, expected one of {choices}",
                 member: Optional[str] = None):
        super().__init__()
        self.setting, self.field, self.default, self.names_class = setting, field, default, names_class
        self.unknown, self.member = unknown, member

    def register(self, *names: str) -> Callable[[T], T]:
        """Class decorator: file the class under each of `names`."""
        def add(cls: T) -> T:
            if self.names_class:
                cls.name = names[0]
            for name in names:
                self[name] = cls
            return cls

        return add

    def lookup(self, name: str) -> type:
        """The class registered as `name`; else ValueError naming the setting and listing the choices."""
        require(name in self, self.setting, self.unknown.format(name=name, choices=sorted(self)))
        return self[name]

    def build(self, d: Mapping, prefix: str, name: Optional[str] = None):
        """An instance from its plain dict (as checkpoints store it and Hydra gives it), each key checked to be a
        field of the class (errors name `prefix`.key). The class: `name`, else d[field], else the default."""
        d = dict(d)
        if name is None:
            name = d.get(self.field, self.default) if self.field is not None else None
        cls = self.lookup(name)
        if self.field is not None:
            d[self.field] = name
        member = self.member.format(name=name) if self.member is not None else None
        return cls(**known_fields(cls, d, prefix, member))


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
