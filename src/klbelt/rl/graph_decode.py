"""Old path of :mod:`klbelt.rl.sampling.graph` (the ``GraphDecoder``); it keeps working."""

from .sampling.graph import CAPACITY_STEP, GraphDecoder, StaticCache  # noqa: F401
