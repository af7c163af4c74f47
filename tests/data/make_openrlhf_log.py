"""Write tests/data/openrlhf_tb with OpenRLHF 0.11.2's own TensorBoard logger (run once; committed).

    python tests/data/make_openrlhf_log.py

OpenRLHF's PPO trainer cannot run here: openrlhf 0.11.2 requires deepspeed==0.19.6,
flash-attn==2.8.3 (CUDA only, no CPU wheel), transformers==5.15.0 (this project runs
5.24) and ray[default]==2.55.0, and its trainer runs its models in Ray actors with
DeepSpeed and vLLM on GPUs. What writes its run files is
``openrlhf.utils.logging_utils.TensorboardLogger`` (``log_train(global_step, logs)``
-> ``add_scalar("train/<key>", value, global_step)``), which needs only torch's
SummaryWriter. This script installs the openrlhf wheel without dependencies into a
temporary folder, loads that one module from it by file (importing the ``openrlhf``
package would pull in deepspeed), and logs 12 steps of OpenRLHF's PPO status keys
(``kl``, ``reward``, ``ppo_kl``, ``policy_loss``, ``response_length``, ``return``)
with made-up values, exactly as ``PPOTrainer.save_logs_and_checkpoints`` hands them
to it. The values are synthetic; the file format, names and prefix are OpenRLHF's.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).parent
VERSION = "0.11.2"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp,
                        f"openrlhf=={VERSION}"], check=True)
        spec = importlib.util.spec_from_file_location("openrlhf_logging_utils",
                                                      Path(tmp) / "openrlhf" / "utils" / "logging_utils.py")
        logging_utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(logging_utils)
        out = HERE / "openrlhf_tb"
        shutil.rmtree(out, ignore_errors=True)
        args = SimpleNamespace(logger=SimpleNamespace(tensorboard_dir=str(out),
                                                      wandb=SimpleNamespace(run_name="ppo_0.11.2")))
        board = logging_utils.TensorboardLogger(args)
        for step in range(1, 13):
            board.log_train(step, {"kl": 0.02 + 0.002 * step, "reward": 0.1 + 0.01 * step, "ppo_kl": 0.003,
                                   "policy_loss": -0.02, "response_length": 40.0, "return": 0.1,
                                   "generated_samples": None})
        board.close()
        print("wrote", out)


if __name__ == "__main__":
    main()
