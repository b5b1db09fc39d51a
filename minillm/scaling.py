"""The frequency scalings' public names from before the package had rooms: minillm.positions.scaling holds them now."""

from minillm.positions.scaling import *  # noqa: F401,F403
