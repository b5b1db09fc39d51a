"""Rotary frequency scalings: each one typed config holding its checks, its formula and its HF parameters.

Same contract as HF transformers' modeling_rope_utils: `frequencies(theta, dim, length)` returns
(inv_freq, attention_factor), computed in float64 so the tables built from them are exact in float32.
Adding a scaling means one class registered here with `@register_scaling` and one YAML in conf/rope_scaling.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{name}: {message}")


def rotary_inv_freq(theta: float, dim: int) -> Tensor:
    """θ_i = theta^(-2i/d), i = 0 .. d/2 - 1 (Su et al. 2021, arXiv:2104.09864, eq. 15)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


SCALINGS: dict[str, type["Scaling"]] = {}


def register_scaling(name: str):
    """Register a Scaling subclass under `name`, the value of its `type` field and its YAML's name."""
    def add(cls: type[Scaling]) -> type[Scaling]:
        cls.name = name
        SCALINGS[name] = cls
        return cls

    return add


@dataclass
class Scaling:
    """No frequency scaling: the rotary frequencies the model was built with."""

    type: str = "none"  # the registry name: checkpoints store it to rebuild the right class
    factor: float = 1.0
    # Length the model was trained at; None means the model's context_length (filled in by `trained_at`).
    original_max_position: Optional[int] = None

    name: ClassVar[str] = "none"
    needs_original: ClassVar[bool] = False  # the formula reads the trained length
    dynamic: ClassVar[bool] = False  # the frequencies depend on the current length
    partial_rotary_in_hf: ClassVar[bool] = True  # HF's `proportional` type can express it for partial rotary

    def __post_init__(self) -> None:
        _require(self.type == self.name, "rope_scaling.type",
                 f"{type(self).__name__} is the {self.name!r} scaling, got type={self.type!r}")
        _require(math.isfinite(self.factor) and self.factor > 0, "rope_scaling.factor",
                 f"must be positive, got {self.factor}")
        if self.original_max_position is not None:
            _require(self.original_max_position > 0, "rope_scaling.original_max_position",
                     f"must be positive, got {self.original_max_position}")

    @property
    def original(self) -> int:
        _require(self.original_max_position is not None, "rope_scaling.original_max_position",
                 f"{self.name} needs the trained length")
        return int(self.original_max_position)

    def trained_at(self, length: int) -> "Scaling":
        """This scaling with original_max_position defaulting to `length` (the model's training length)."""
        if self.original_max_position is not None:
            return self
        return dataclasses.replace(self, original_max_position=length)

    def check_dim(self, rotary_dim: int) -> None:
        """Raise if the formula is undefined for this many rotary channels."""

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        """(inv_freq float64 (dim/2,), attention_factor) for a sequence of `length` positions."""
        return rotary_inv_freq(theta, dim), 1.0

    def factor_for(self, length: int, trained_length: int) -> float:
        """The factor an inference-time evaluation at `length` uses: length / trained length."""
        return max(1.0, length / trained_length)

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        """HF `rope_parameters` reproducing these frequencies, and max_position_embeddings (HF's convention:
        the length the scaled model is meant for)."""
        return {"rope_type": "default", "rope_theta": theta}, context_length

    def extended_length(self, context_length: int) -> int:
        original = self.original_max_position or context_length
        return max(context_length, math.ceil(original * self.factor))

    @property
    def label(self) -> str:
        """'' for no scaling, else '+yarn×4'."""
        return "" if self.name == "none" else f" +{self.name}×{self.factor:g}"


register_scaling("none")(Scaling)


@register_scaling("linear")
@dataclass
class LinearScaling(Scaling):
    """Position interpolation (Chen et al. 2023, arXiv:2306.15595): m -> m / factor, i.e. θ_i / factor."""

    type: str = "linear"
    factor: float = 4.0

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        return rotary_inv_freq(theta, dim) / self.factor, 1.0

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        return {"rope_type": "linear", "rope_theta": theta, "factor": self.factor}, self.extended_length(context_length)


@register_scaling("ntk")
@dataclass
class NTKScaling(Scaling):
    """NTK-aware (bloc97 2023): base' = base · factor^(d/(d-2)), so the lowest frequency is interpolated by factor."""

    type: str = "ntk"
    factor: float = 4.0

    def check_dim(self, rotary_dim: int) -> None:
        _require(rotary_dim > 2, "rope.rotary_dim", f"{self.name} scales theta by factor^(d/(d-2)) and needs d > 2, "
                                                    f"got {rotary_dim}")

    def scaled_theta(self, theta: float, dim: int) -> float:
        return theta * self.factor ** (dim / (dim - 2))

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        return rotary_inv_freq(self.scaled_theta(theta, dim), dim), 1.0

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        # Static NTK is plain RoPE with a larger base.
        return {"rope_type": "default", "rope_theta": self.scaled_theta(theta, dim)}, context_length


@register_scaling("dynamic_ntk")
@dataclass
class DynamicNTKScaling(NTKScaling):
    """Dynamic NTK (emozilla 2023; HF `_compute_dynamic_ntk_parameters`): NTK with factor tracking the length L.

    base' = base · (factor·L/L0 − (factor − 1))^(d/(d−2)) for L > L0, the plain base up to L0.
    """

    type: str = "dynamic_ntk"
    factor: float = 4.0

    needs_original: ClassVar[bool] = True
    dynamic: ClassVar[bool] = True
    partial_rotary_in_hf: ClassVar[bool] = False

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        if length <= self.original:
            return rotary_inv_freq(theta, dim), 1.0
        base = theta * (self.factor * length / self.original - (self.factor - 1)) ** (dim / (dim - 2))
        return rotary_inv_freq(base, dim), 1.0

    def factor_for(self, length: int, trained_length: int) -> float:
        # Its base already follows the length, base·(L/L0)^(d/(d−2)): a second factor would scale twice.
        return 1.0

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        # HF's dynamic NTK takes the trained length L0 from max_position_embeddings.
        return {"rope_type": "dynamic", "rope_theta": theta, "factor": self.factor}, self.original


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature: sqrt(1/t) = 0.1·ln(s) + 1 (Peng et al. 2023, eq. 22), applied to q and k alike."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


@register_scaling("yarn")
@dataclass
class YarnScaling(Scaling):
    """YaRN "NTK-by-parts" (Peng et al. 2023, arXiv:2309.00071, eq. 17-20; HF `_compute_yarn_parameters`).

    Dimensions that turn more than beta_fast times over the trained length keep their frequency,
    those turning fewer than beta_slow times are interpolated by factor, a linear ramp in between;
    q and k are multiplied by the attention factor (a temperature on the scores).
    """

    type: str = "yarn"
    factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # None: 0.1 * ln(factor) + 1

    needs_original: ClassVar[bool] = True
    partial_rotary_in_hf: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.beta_fast > self.beta_slow > 0, "rope_scaling.beta_fast",
                 f"need beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}")
        if self.attention_factor is not None:
            _require(self.attention_factor > 0, "rope_scaling.attention_factor",
                     f"must be positive, got {self.attention_factor}")

    @property
    def temperature(self) -> float:
        return yarn_attention_factor(self.factor) if self.attention_factor is None else float(self.attention_factor)

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over L0
            return dim * math.log(self.original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp (as the reference does)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it
        inv_freq = rotary_inv_freq(theta, dim)
        return inv_freq / self.factor * (1 - extrapolate) + inv_freq * extrapolate, self.temperature

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        return {"rope_type": "yarn", "rope_theta": theta, "factor": self.factor,
                "original_max_position_embeddings": self.original, "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow, "attention_factor": self.temperature}, self.extended_length(context_length)


@register_scaling("llama3")
@dataclass
class Llama3Scaling(Scaling):
    """Llama 3.1 (Meta 2024, arXiv:2407.21783; HF `_compute_llama3_parameters`): wavelengths above
    L0/low_freq_factor are divided by factor, those below L0/high_freq_factor kept, a smooth ramp between."""

    type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    needs_original: ClassVar[bool] = True
    partial_rotary_in_hf: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # equal factors would divide by zero: NaN frequencies, no error
        _require(self.high_freq_factor > self.low_freq_factor > 0, "rope_scaling.high_freq_factor",
                 f"need high_freq_factor > low_freq_factor > 0, got {self.high_freq_factor} "
                 f"and {self.low_freq_factor}")

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        inv_freq = rotary_inv_freq(theta, dim)
        wavelength = 2 * math.pi / inv_freq
        smooth = ((self.original / wavelength - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor)).clamp(0, 1)
        return (1 - smooth) * inv_freq / self.factor + smooth * inv_freq, 1.0

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        return {"rope_type": "llama3", "rope_theta": theta, "factor": self.factor,
                "original_max_position_embeddings": self.original, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor}, self.extended_length(context_length)


def known_fields(cls: type, d: dict, prefix: str) -> dict:
    """d itself, after checking that every key is a field of the dataclass cls."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    _require(not unknown, f"{prefix}.{unknown[0] if unknown else ''}",
             f"not a setting of {cls.__name__} (it has {sorted(names)})")
    return d


def scaling_config(d: "dict | Scaling | None") -> Scaling:
    """A scaling from its plain dict (as stored in checkpoints), or None for no scaling."""
    if isinstance(d, Scaling):
        return d
    d = dict(d or {})
    kind = d.get("type", "none")
    _require(kind in SCALINGS, "rope_scaling.type", f"got {kind!r}, expected one of {sorted(SCALINGS)}")
    return SCALINGS[kind](**known_fields(SCALINGS[kind], d, "rope_scaling"))
