"""Old path of :mod:`klbelt.rl.sampling.lean` (the ``LeanDecoder``); it keeps working."""

from .sampling.lean import ARCHITECTURES, DecoderOutput, LeanCache, LeanDecoder, bind_modules, unsupported  # noqa: F401
