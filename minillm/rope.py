"""The position encodings' public names from before the package had rooms: minillm.positions holds them now."""

from minillm.positions.absolute import *  # noqa: F401,F403
from minillm.positions.base import *  # noqa: F401,F403
from minillm.positions.bias import *  # noqa: F401,F403
from minillm.positions.contextual import *  # noqa: F401,F403
from minillm.positions.rotary import *  # noqa: F401,F403
