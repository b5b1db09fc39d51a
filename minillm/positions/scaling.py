"""Rotary frequency scalings: each one typed config holding its checks, its formula and its HF parameters.

Same contract as HF transformers' modeling_rope_utils: `frequencies(theta, dim, length)` returns
(inv_freq, attention_factor), computed in float64 so the tables built from them are exact in float32.
Adding a scaling means one class registered here with `@register_scaling` and one YAML in conf/rope_scaling;
Resonance RoPE, which rounds the others' wavelengths, is in resonance.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch import Tensor

from minillm.registry import Registry, finite, positive, require


def rotary_inv_freq(theta: float, dim: int) -> Tensor:
    """θ_i = theta^(-2i/d), i = 0 .. d/2 - 1 (Su et al. 2021, arXiv:2104.09864, eq. 15)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


# Each Scaling subclass under its name: the value of its `type` field and its YAML's name.
SCALINGS = Registry("rope_scaling.type", field="type", default="none")
register_scaling = SCALINGS.register


@dataclass
class Scaling:
    """No frequency scaling: the rotary frequencies the model was built with."""

    type: str = "none"  # the registry name: checkpoints store it to rebuild the right class
    factor: float = 1.0  # the scale: the length meant for ÷ the trained length
    original_max_position: Optional[int] = None  # the length the model was trained at; None: model.context_length

    name: ClassVar[str] = "none"
    needs_original: ClassVar[bool] = False  # the formula reads the trained length
    dynamic: ClassVar[bool] = False  # the frequencies depend on the current length
    partial_rotary_in_hf: ClassVar[bool] = True  # HF's `proportional` type can express it for partial rotary
    from_factor: ClassVar[bool] = True  # a factor alone defines it, so evaluation can apply it to any checkpoint

    def __post_init__(self) -> None:
        require(self.type == self.name, "rope_scaling.type",
                 f"{type(self).__name__} is the {self.name!r} scaling, got type={self.type!r}")
        positive(self.factor, "rope_scaling.factor")
        if self.original_max_position is not None:
            require(self.original_max_position > 0, "rope_scaling.original_max_position",
                     f"must be positive, got {self.original_max_position}")
        finite(self, "rope_scaling", Scaling)

    @property
    def original(self) -> int:
        require(self.original_max_position is not None, "rope_scaling.original_max_position",
                 f"{self.name} needs the trained length")
        return int(self.original_max_position)

    def trained_at(self, length: int) -> "Scaling":
        """This scaling with original_max_position defaulting to `length` (the model's training length)."""
        if self.original_max_position is not None:
            return self
        return dataclasses.replace(self, original_max_position=length)

    def check_length(self, trained_length: int) -> None:
        """Raise if the formula is undefined for this trained length (original_max_position, else the model's)."""

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

    type: str = "linear"  # the registry name (rope_scaling=linear)
    factor: float = 4.0  # the scale: the length meant for ÷ the trained length

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        return rotary_inv_freq(theta, dim) / self.factor, 1.0

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        return {"rope_type": "linear", "rope_theta": theta, "factor": self.factor}, self.extended_length(context_length)


@register_scaling("ntk")
@dataclass
class NTKScaling(Scaling):
    """NTK-aware (bloc97 2023): base' = base · factor^(d/(d-2)), so the lowest frequency is interpolated by factor."""

    type: str = "ntk"  # the registry name (rope_scaling=ntk)
    factor: float = 4.0  # the scale: the length meant for ÷ the trained length

    def check_dim(self, rotary_dim: int) -> None:
        require(rotary_dim > 2, "rope.rotary_dim", f"{self.name} scales theta by factor^(d/(d-2)) and needs d > 2, "
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

    type: str = "dynamic_ntk"  # the registry name (rope_scaling=dynamic_ntk)
    factor: float = 4.0  # the scale: the length meant for ÷ the trained length

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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature sqrt(1/t) = 0.1·mscale·ln(s) + 1 for s > 1, else 1 (Peng et al. 2023, arXiv:2309.00071,
    eq. 22, mscale 1; DeepSeek-V2, arXiv:2405.04434, mscale 0.707), applied to q and k alike."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0  # HF's get_mscale, term for term


@register_scaling("yarn")
@dataclass
class YarnScaling(Scaling):
    """YaRN "NTK-by-parts" (Peng et al. 2023, arXiv:2309.00071, eq. 17-20; HF `_compute_yarn_parameters`).

    Dimensions that turn more than beta_fast times over the trained length keep their frequency,
    those turning fewer than beta_slow times are interpolated by factor, a linear ramp in between;
    q and k are multiplied by the attention factor (a temperature on the scores).
    """

    type: str = "yarn"  # the registry name (rope_scaling=yarn)
    factor: float = 4.0  # the scale: the length meant for ÷ the trained length
    beta_fast: float = 32.0  # dimensions turning more than this many times over the trained length are kept
    beta_slow: float = 1.0  # dimensions turning fewer than this many times are interpolated by factor
    # the factor on q and k; None: 0.1·ln(factor) + 1, or DeepSeek's ratio when mscale is set (a given one wins)
    attention_factor: Optional[float] = None
    mscale: Optional[float] = None  # set both or neither: HF reads them only as a pair
    mscale_all_dim: Optional[float] = None  # DeepSeek's denominator temperature: mscale(factor, mscale_all_dim)
    truncate: bool = True  # round the ramp's ends out to whole dimensions; False: as computed (gpt-oss)

    needs_original: ClassVar[bool] = True
    partial_rotary_in_hf: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self.beta_slow, "rope_scaling.beta_slow")
        require(self.beta_fast > self.beta_slow, "rope_scaling.beta_fast",
                 f"need beta_fast > beta_slow, got {self.beta_fast} and {self.beta_slow}")
        if self.attention_factor is not None:
            positive(self.attention_factor, "rope_scaling.attention_factor")
        # HF uses mscale only when mscale_all_dim is set too (DeepSeek's reference defaults the latter to 0):
        # one without the other would mean different temperatures to HF and to DeepSeek.
        require((self.mscale is None) == (self.mscale_all_dim is None), "rope_scaling.mscale",
                 f"set mscale and mscale_all_dim together, got {self.mscale} and {self.mscale_all_dim}")
        for name in ("mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                positive(getattr(self, name), f"rope_scaling.{name}")
        finite(self, "rope_scaling", YarnScaling)

    def temperature_at(self, factor: float) -> float:
        """The attention factor when the frequencies are interpolated by `factor`."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale is not None:  # DeepSeek (arXiv:2405.04434): the ratio of two YaRN temperatures
            return float(yarn_mscale(factor, self.mscale) / yarn_mscale(factor, self.mscale_all_dim))
        return yarn_mscale(factor)

    @property
    def temperature(self) -> float:
        return self.temperature_at(self.factor)

    def correction_range(self, theta: float, dim: int) -> tuple[float, float]:
        """(low, high): the ramp's ends in pair indices, HF's `find_correction_range` (clamped to [0, dim − 1],
        HF's bound, not dim/2 − 1)."""
        def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over L0
            return dim * math.log(self.original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def interpolated(self, theta: float, dim: int, factor: float) -> Tensor:
        """Pairs below the ramp keep θ_i, those above it get θ_i / factor, linear in between (eq. 18-20)."""
        low, high = self.correction_range(theta, dim)
        if low == high:
            high += 0.001  # avoid a zero-width ramp (as the reference does)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolate = 1 - ramp  # 1: keep the frequency, 0: interpolate it
        inv_freq = rotary_inv_freq(theta, dim)
        return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        return self.interpolated(theta, dim, self.factor), self.temperature

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        # The settings as they are, so that HF derives the temperature by its own formula; truncate only when
        # off (HF's default is on), as gpt-oss's config has it.
        params = {"rope_type": "yarn", "rope_theta": theta, "factor": self.factor,
                  "original_max_position_embeddings": self.original, "beta_fast": self.beta_fast,
                  "beta_slow": self.beta_slow}
        optional = {"attention_factor": self.attention_factor, "mscale": self.mscale,
                    "mscale_all_dim": self.mscale_all_dim}
        params.update({k: float(v) for k, v in optional.items() if v is not None})
        if not self.truncate:
            params["truncate"] = False
        return params, self.extended_length(context_length)


@register_scaling("dynamic_yarn")
@dataclass
class DynamicYarnScaling(YarnScaling):
    """Dynamic YaRN (Peng et al. 2023, arXiv:2309.00071, sec. 3.3 "Dynamic Scaling"; jquesnelle/yarn
    `LlamaDynamicYaRNScaledRotaryEmbedding`): YaRN with s = max(factor, L/L0) for a sequence of L positions.

    factor is the scale the model was fine-tuned at (the reference's finetuned=True), 1 for a model that was
    not: plain RoPE up to L0, then YaRN at s = L/L0, its temperature included. An explicit attention_factor
    replaces the temperature as in static YaRN (the reference multiplies it instead). HF has no dynamic YaRN.
    """

    type: str = "dynamic_yarn"  # the registry name (rope_scaling=dynamic_yarn)
    factor: float = 1.0  # the scale the model was fine-tuned at; 1: not fine-tuned

    dynamic: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.factor >= 1, "rope_scaling.factor",
                 f"dynamic_yarn's factor is the scale the model was fine-tuned at, at least 1; got {self.factor}")

    def scale_at(self, length: int) -> float:
        """s = max(factor, L/L0): the fine-tuned scale, growing with the length past factor·L0."""
        return max(self.factor, length / self.original)

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        scale = self.scale_at(length)
        return self.interpolated(theta, dim, scale), self.temperature_at(scale)

    def factor_for(self, length: int, trained_length: int) -> float:
        # Its scale already follows the length: a factor of length / trained length would scale twice.
        return 1.0

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        raise ValueError(f"rope_scaling.type={self.name!r} is not LLaMA-compatible (HF transformers has no dynamic "
                         f"YaRN; LLaMA uses a static scaling: export with rope_scaling=yarn at a fixed factor)")


@register_scaling("llama3")
@dataclass
class Llama3Scaling(Scaling):
    """Llama 3.1 (Meta 2024, arXiv:2407.21783; HF `_compute_llama3_parameters`): wavelengths above
    L0/low_freq_factor are divided by factor, those below L0/high_freq_factor kept, a smooth ramp between."""

    type: str = "llama3"  # the registry name (rope_scaling=llama3)
    factor: float = 8.0  # the scale: the length meant for ÷ the trained length
    low_freq_factor: float = 1.0  # wavelengths above L0/low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # wavelengths below L0/high_freq_factor are kept

    needs_original: ClassVar[bool] = True
    partial_rotary_in_hf: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        # equal factors would divide by zero: NaN frequencies, no error
        positive(self.low_freq_factor, "rope_scaling.low_freq_factor")
        require(self.high_freq_factor > self.low_freq_factor, "rope_scaling.high_freq_factor",
                 f"need high_freq_factor > low_freq_factor, got {self.high_freq_factor} and {self.low_freq_factor}")
        finite(self, "rope_scaling", Llama3Scaling)

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


@register_scaling("longrope")
@dataclass
class LongRopeScaling(Scaling):
    """LongRoPE (Ding et al. 2024, arXiv:2402.13753; HF `_compute_longrope_parameters`): θ_i / λ_i with a
    searched rescale factor λ_i per frequency, `short_factor` for sequences up to L0, `long_factor` beyond.

    The switch follows the length of the sequence: long factors when L > L0 (HF's forward and Phi-3's
    modeling code; HF's init-time table is the short one, as our `inv_freq` at the training length).
    factor = the extended length / L0 (HF's max_position_embeddings / original_max_position_embeddings, what
    HF derives when `factor` is absent); it sets the attention factor sqrt(1 + ln(factor)/ln(L0)) (Phi-3's
    modeling code, arXiv:2404.14219), applied at every length, unless attention_factor is given.
    """

    type: str = "longrope"  # the registry name (rope_scaling=longrope)
    factor: float = 4.0  # the scale: the length meant for ÷ the trained length
    short_factor: Optional[list[float]] = None  # λ_i up to L0, rotary_dim/2 values (checked against the model)
    long_factor: Optional[list[float]] = None  # λ_i past L0, rotary_dim/2 values
    attention_factor: Optional[float] = None  # None: sqrt(1 + ln(factor)/ln(L0)) (Phi-3)
    # a result of scripts/longrope_search.py, read once into factor, original_max_position and both factor lists
    factors: Optional[str] = None

    needs_original: ClassVar[bool] = True
    dynamic: ClassVar[bool] = True
    partial_rotary_in_hf: ClassVar[bool] = False
    from_factor: ClassVar[bool] = False  # its per-frequency factors are searched for one model

    def __post_init__(self) -> None:
        if self.factors is not None and (self.short_factor is None or self.long_factor is None):
            self.read_factors()  # once: a checkpoint keeps the lists, and its rebuild needs no file
        super().__post_init__()
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is None:
                continue
            values = [float(v) for v in values]  # a plain list (Hydra hands over a ListConfig)
            require(len(values) > 0 and all(math.isfinite(v) and v > 0 for v in values), f"rope_scaling.{name}",
                     f"must be finite positive rescale factors, got {values}")
            setattr(self, name, values)
        if self.attention_factor is not None:
            positive(self.attention_factor, "rope_scaling.attention_factor")
        finite(self, "rope_scaling", LongRopeScaling)

    def read_factors(self) -> None:
        """factor, original_max_position and both lists from the result file `factors` (a given
        original_max_position must agree with it)."""
        require(self.short_factor is None and self.long_factor is None, "rope_scaling.factors",
                 "give the searched file or short_factor and long_factor, not both")
        try:
            result = json.loads(Path(self.factors).expanduser().read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"rope_scaling.factors: {self.factors} cannot be read as a LongRoPE search result "
                             f"({getattr(error, 'strerror', None) or error})") from None
        keys = ("factor", "original_max_position", "short_factor", "long_factor")
        require(isinstance(result, dict) and result.get("type") == "longrope" and all(k in result for k in keys),
                 "rope_scaling.factors", f"{self.factors} is no result of scripts/longrope_search.py (it needs "
                 f"type: longrope, {', '.join(keys)})")
        require(self.original_max_position in (None, result["original_max_position"]), "rope_scaling.factors",
                 f"{self.factors} was searched for a trained length of {result['original_max_position']}, "
                 f"rope_scaling.original_max_position is {self.original_max_position}")
        self.factor, self.original_max_position = float(result["factor"]), int(result["original_max_position"])
        self.short_factor, self.long_factor = result["short_factor"], result["long_factor"]

    def check_dim(self, rotary_dim: int) -> None:
        if self.factors is not None and self.long_factor is not None:
            require(len(self.long_factor) == rotary_dim // 2, "rope_scaling.factors",
                     f"{self.factors} holds {len(self.long_factor)} factors, this model has rotary_dim/2 = "
                     f"{rotary_dim // 2} frequencies: it was searched for another model")
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            require(values is not None, f"rope_scaling.{name}",
                     f"longrope needs its searched factors, one per frequency: {rotary_dim // 2} values "
                     f"(rope_scaling.factors=<a result of scripts/longrope_search.py>)")
            require(len(values) == rotary_dim // 2, f"rope_scaling.{name}",
                     f"needs one factor per frequency, rotary_dim/2 = {rotary_dim // 2}, got {len(values)}")

    def check_length(self, trained_length: int) -> None:
        require(self.attention_factor is not None or self.factor <= 1.0 or trained_length >= 2,
                 "rope_scaling.original_max_position", f"longrope's temperature sqrt(1 + ln s / ln L0) needs "
                 f"L0 >= 2 (got {trained_length}; or set rope_scaling.attention_factor)")

    @property
    def temperature(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original))  # HF's, term for term

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        self.check_dim(dim)
        factors = self.long_factor if length > self.original else self.short_factor
        return rotary_inv_freq(theta, dim) / torch.tensor(factors, dtype=torch.float64), self.temperature

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        params = {"rope_type": "longrope", "rope_theta": theta, "factor": self.factor,
                  "original_max_position_embeddings": self.original, "short_factor": list(self.short_factor),
                  "long_factor": list(self.long_factor)}
        if self.attention_factor is not None:
            params["attention_factor"] = float(self.attention_factor)
        return params, self.extended_length(context_length)


def scaling_config(d: "dict | Scaling | None") -> Scaling:
    """A scaling from its plain dict (as stored in checkpoints), or None for no scaling."""
    if isinstance(d, Scaling):
        return d
    return SCALINGS.build(d or {}, "rope_scaling")
