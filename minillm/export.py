"""Export's public names from before the package had rooms: minillm.interop.export holds them now."""

from minillm.interop.export import *  # noqa: F401,F403
