"""The axis users vary: position encodings, frequency scalings, evaluation-time attention methods, position samplers.

Importing the package imports every member module, so each registry holds all of its members.
"""

from minillm.positions import (  # noqa: F401
    absolute, base, bias, contextual, forgetting, fourier, methods, polar, resonance, rotary, samplers, scaling, stickbreaking,
)
