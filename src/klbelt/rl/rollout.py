"""Old home of sampling and scoring; both moved (this path keeps working).

The :class:`Rollout` and the samplers: :mod:`klbelt.rl.sampling`. Log-probs, entropy
and the fused head: :mod:`klbelt.rl.scoring`. Hugging Face plumbing: :mod:`klbelt.rl.hf`.
"""

from .hf import last_positions, position_ids, unwrap  # noqa: F401
from .sampling.policy import filter_logits, inverse_cdf, sample  # noqa: F401
from .sampling.rollout import Rollout  # noqa: F401
from .scoring import entropy_from_logits, fused_head, response_logits, response_logprobs, set_fused_head  # noqa: F401
