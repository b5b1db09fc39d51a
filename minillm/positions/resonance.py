"""Resonance RoPE: any factor-defined scaling's frequencies, each wavelength rounded to a whole number of tokens."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from minillm.positions.scaling import SCALINGS, Scaling, register_scaling
from minillm.registry import choice, require

# The settings Resonance holds for the scaling it rounds: one factor and one trained length for both.
SHARED = ("factor", "original_max_position")


def integer_wavelengths(inv_freq: Tensor) -> Tensor:
    """θ̃_i = 2π / round(2π / θ_i) (Wang et al. 2024, arXiv:2403.00071, Algorithm 1): feature i repeats exactly
    every round(λ_i) tokens, so a position past the training length L takes an angle already seen in training
    wherever λ̃_i ≤ L (the pre-critical features). Every feature is rounded, as the paper's algorithm and its
    authors' code (sheryc/resonance_rope) do; past L a wavelength moves by at most half a token."""
    return 2 * math.pi / torch.round(2 * math.pi / inv_freq)


@register_scaling("resonance")
@dataclass
class ResonanceScaling(Scaling):
    """Resonance RoPE (Wang et al. 2024, arXiv:2403.00071): the frequencies of the scaling `over`, then every
    wavelength rounded to a whole number of tokens; over=yarn is the paper's Resonance YaRN (YaRN first, then the
    rounding, as its Algorithm 1 and code order them). The attention factor is the rounded scaling's (YaRN's
    temperature). HF transformers has no Resonance RoPE: an export refuses it.
    """

    type: str = "resonance"  # the registry name (rope_scaling=resonance)
    factor: float = 4.0  # the scale of the scaling rounded (over none it only sets the length meant for)
    over: Any = "none"  # the scaling rounded: its name (none, linear, ntk, yarn, ...) or its settings {type: yarn, ...}

    def __post_init__(self) -> None:
        if isinstance(self.over, Mapping):
            self.over = dict(self.over)  # a plain dict, as a checkpoint stores it (Hydra hands over a DictConfig)
        settings = self.over_settings()
        require(isinstance(settings.get("type"), str), "rope_scaling.over",
                f"name the scaling to round, or give its settings with its type; got {self.over!r}")
        choice(settings["type"], "rope_scaling.over", self.roundable())
        shared = [name for name in SHARED if name in settings]
        require(not shared, f"rope_scaling.over.{shared[0] if shared else ''}",
                f"Resonance and the scaling it rounds share one: set rope_scaling.{shared[0] if shared else ''}")
        super().__post_init__()
        self.rounded_scaling()  # built once now: a bad setting of it is refused at construction, by name

    def over_settings(self) -> dict:
        """The rounded scaling's own settings, its type among them."""
        return dict(self.over) if isinstance(self.over, dict) else {"type": self.over}

    @staticmethod
    def roundable() -> list[str]:
        """The scalings Resonance rounds: every one a factor defines (not longrope's searched factors), but itself."""
        return [name for name, cls in SCALINGS.items() if cls.from_factor and not issubclass(cls, ResonanceScaling)]

    def rounded_scaling(self) -> Scaling:
        """The scaling `over` with this factor and trained length."""
        settings = self.over_settings()
        try:
            return SCALINGS.build({**settings, **{name: getattr(self, name) for name in SHARED}}, "rope_scaling.over")
        except ValueError as error:  # its checks name rope_scaling.<knob>: here that knob is rope_scaling.over.<knob>
            setting, _, message = str(error).partition(": ")
            knob = setting.removeprefix("rope_scaling.")
            own = {f.name for f in dataclasses.fields(SCALINGS[settings["type"]])} - {"type", *SHARED}
            if knob in own:
                raise ValueError(f"rope_scaling.over.{knob}: {message}") from None
            raise

    @property
    def dynamic(self) -> bool:  # type: ignore[override]  # as the scaling rounded: its frequencies may follow L
        return self.rounded_scaling().dynamic

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        return self.rounded_scaling().needs_original

    def check_length(self, trained_length: int) -> None:
        self.rounded_scaling().check_length(trained_length)

    def check_dim(self, rotary_dim: int) -> None:
        self.rounded_scaling().check_dim(rotary_dim)

    def frequencies(self, theta: float, dim: int, length: int) -> tuple[Tensor, float]:
        inv_freq, attention_factor = self.rounded_scaling().frequencies(theta, dim, length)
        return integer_wavelengths(inv_freq), attention_factor

    def factor_for(self, length: int, trained_length: int) -> float:
        # Over none the factor scales nothing: the rounding alone is read at every length.
        scaling = self.rounded_scaling()
        return 1.0 if scaling.name == "none" else scaling.factor_for(length, trained_length)

    def hf_parameters(self, theta: float, dim: int, context_length: int) -> tuple[dict, int]:
        raise ValueError(f"rope_scaling.type={self.name!r} is not LLaMA-compatible (HF transformers has no Resonance "
                         f"RoPE: no rope type of its rounds wavelengths to whole tokens)")

    @property
    def label(self) -> str:
        """' +resonance' over no scaling, else ' +resonance(yarn)×4'."""
        scaling = self.rounded_scaling()
        return " +resonance" + (f"({scaling.name})×{self.factor:g}" if scaling.name != "none" else "")
