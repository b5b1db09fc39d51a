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
