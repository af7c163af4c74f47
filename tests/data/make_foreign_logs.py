"""Write the foreign-format logs in tests/data that no framework wrote here (run once; committed).

    python tests/data/make_foreign_logs.py

Built from each framework's documented / source-code metric names, NOT written by
the framework (see docs/readers.md; the TRL logs are written by TRL, make_trl_logs.py, and the OpenRLHF
log by OpenRLHF's logger, make_openrlhf_log.py):
  * verl_old_policy_only.jsonl: verl's file-logger format with actor/ppo_kl (old-vs-new
    policy KL) as its only KL column.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def verl_old_policy_only():
    lines = [json.dumps({"step": s, "data": {"actor/ppo_kl": 0.002, "actor/pg_loss": -0.01}}) for s in range(1, 13)]
    (HERE / "verl_old_policy_only.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    verl_old_policy_only()
