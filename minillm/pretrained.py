"""Import's public names from before the package had rooms: minillm.interop.pretrained holds them now."""

from minillm.interop.pretrained import *  # noqa: F401,F403
