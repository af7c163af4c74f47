"""Old home of the samplers and the importance weighting; both moved (this path keeps working).

Choosing a sampler and its backends: :mod:`klbelt.rl.sampling`. The correction for a
sampler that is not the policy: :mod:`klbelt.rl.importance`.
"""

from .importance import CORRECTIONS, RolloutCorrection, filtered_mass, mismatch_metrics  # noqa: F401
from .sampling import SAMPLERS, bf16_sample, make_sampler  # noqa: F401
from .sampling.rollout import Rollout  # noqa: F401
