"""The trainer's configuration: one dataclass, every knob documented in place.

The comment beside each field is its help text (``klbelt train --help``,
``TrainConfig.field_help``); a new field needs one (a test checks), or
``field(metadata={"help": ...})``. Reading files and command-line values,
TRL/verl aliases: ``klbelt.rl.fields``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    # --- model and data
    model: str = "demo"  # "demo" (built-in tiny GPT-2), "smollm2", or a local Hugging Face model directory
    prompts: str = "demo"  # "demo" (corpus prompts) or a .txt (one per line) / .jsonl ({"prompt": ...}) file
    reward: str = "vader"  # "vader" (demo proxy), a local sequence-classification model dir, or "module:function"
    seed: int = 0  # seeds sampling, shuffling and initialisation
    device: str = "cpu"  # torch device of models and tensors
    lora_rank: int = field(default=0, metadata={"help": (
        '0 = full fine-tune; r > 0 trains LoRA adapters (peft) and scores the reference with them disabled')})
    lora_alpha: float | None = None  # LoRA scale numerator (default 2 * lora_rank)
    reference: str = field(default="initial", metadata={"help": (
        'the frozen reference: "initial" (the policy as given, its adapters included, frozen) or "base" '
        '(every adapter disabled: the bare base model)')})
    ref_sync_every: int = field(default=0, metadata={"help": (
        "0 = never; N > 0: every N updates the reference becomes the current policy (TR-DPO's hard update; "
        'the controller keeps its state)')})
    fused_head: bool = field(default=True, metadata={"help": (
        'log-probs from the last hidden states and the LM head in row blocks, never the [B, R, V] logits '
        '(false: full logits)')})
    bf16: bool = field(default=False, metadata={"help": (
        'bf16 autocast for the trained forward passes where the CPU/GPU supports it; log-probs and KL stay '
        'fp32')})
    attn_implementation: str = field(default="model", metadata={"help": (
        'attention of every pass: "model" (as loaded), "sdpa", "eager" (Hugging Face\'s), "klbelt_fp32" '
        '(scores, softmax and sum in fp32, materialised: fastest on CPU for short sequences, O(length^2) '
        'memory) or "auto" (klbelt_fp32 on the CPU, sdpa on a GPU)')})
    bf16_base: bool = field(default=False, metadata={"help": (
        'with bf16, LoRA and a sampler other than "policy": store the frozen base\'s linear weights as the '
        'bf16 values autocast reads (exact, faster, less memory); fp32 again when the run ends')})
    # --- rollouts
    steps: int = 100  # PPO updates (one batch of rollouts each)
    batch_size: int = 32  # sequences per update (prompts x group_size)
    group_size: int = 1  # samples per prompt; >= 2 enables the group baseline
    max_new_tokens: int = 24  # response length limit
    temperature: float = 1.0  # sampling temperature; log-probs and KL use the same one
    top_k: int = 0  # 0 = off (sample from the full distribution)
    top_p: float = 1.0  # 1.0 = off
    stop_on_eos: bool = True  # end a response at EOS (masked after it)
    block_eos: bool = False  # never sample EOS: every response is full length
    sampler: str = field(default="policy", metadata={"help": (
        'who draws rollouts: "policy" (the trained model, as trained), "bf16" (same weights, bf16 autocast + '
        'KV cache: a real sampler/trainer mismatch), "bf16-merged" (a bf16 copy of the weights, LoRA merged '
        'in, synced before each rollout: an inference engine\'s weights, in process) or "vllm" (vLLM\'s CPU '
        'build, bf16, in its own venv)')})
    vllm_python: str | None = field(default=None, metadata={"help": (
        'sampler "vllm": the python of the venv with vLLM (scripts/setup_vllm.sh; null: $KLBELT_VLLM_PYTHON)')})
    rollout_correction: str = field(default="off", metadata={"help": (
        'sampler != policy: "off", "tis" (token min(pi/mu, is_cap)), "mis" (sequence masked IS), "band" '
        '(token weight 0 outside is_band)')})
    is_cap: float = field(default=2.0, metadata={"help": (
        "the issue's `cap`: truncation cap (tis) / upper edge (mis) of the importance weight pi/mu, > 1")})
    is_band: list[float] | None = field(default=None, metadata={"help": (
        'the issue\'s `band`: [lo, hi] with 0 <= lo < 1 < hi for "band"/"mis" (null: [0.5, 2.0] for "band")')})
    # --- KL penalty
    kl_in: str = "reward"  # "reward": -beta*k1 per token in the reward (PPO); "loss": beta*k2|k3 in the loss (GRPO)
    kl_estimator: str = field(default="k1", metadata={"help": (
        'estimator for kl_in: k1 (reward), k2 or k3 (loss); "exact" (kl_in reward): the logged and controlled '
        'KL is the exact full-vocabulary KL(pi || ref) per visited position (always so under top_k/top_p)')})
    kl_ratio_correction: bool = field(default=True, metadata={"help": (
        "kl_in loss: weigh each token's KL by pi_theta/pi_old (TRL's use_bias_correction_kl; k3: the "
        'differentiable ratio, k2: its value), so later epochs/minibatches keep the gradient of KL(pi_theta '
        '|| ref)')})
    kl_coef: float = 0.1  # beta, or the initial beta of an adaptive controller
    controller: str = "adaptive"  # "fixed", "adaptive" (step rule), "proportional" (Ziegler 2019) or "pid"
    target_kl: float = 0.05  # controller target, in the controller's unit (kl_unit)
    kl_unit: str = "token-mean"  # "token-mean" (nats/token) or "seq-sum" (nats/sequence) for the controller
    horizon: int = 10000  # proportional controller horizon (sequences)
    pid_gains: list[float] | None = None  # [kp, ki, kd] of the "pid" controller per update (null: 0.05, 0.02, 1.0)
    pid_warmup: int = 0  # "pid": first updates with beta >= kl_coef and no integral decrease (KL starts at 0); 0 = off
    pid_smoothing: float = 0.8  # "pid": EMA weight on the past KL for the P and D terms, in [0, 1)
    pid_min_kl_coef: float = 0.0  # "pid": floor on beta (and on its integral), >= 0
    controller_estimator: str = "k1"  # the controller's input: mean "k1" (the logged kl) or "k3" (unbiased, less noisy)
    log_ratio_clamp: float | None = None  # off; c > 0 clamps each token's log-ratio to [-c, c] in the KL penalty
    clamp_gradient: str = "zero"  # clamped tokens' gradient: "zero" (plain clamp) or "pass" (straight-through)
    # --- advantages and PPO
    advantage: str = "gae"  # "gae" (value model) or "group" (critic-free baseline over each group)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages over the batch's valid tokens
    ppo_epochs: int = 1  # passes over each batch
    minibatches: int = 1  # minibatches per pass
    clip_range: float = 0.2  # PPO ratio clip
    value_clip: float = 0.2  # value clip (absolute)
    vf_coef: float = 0.5  # value loss weight
    entropy_coef: float = 0.0  # entropy bonus weight
    lr: float = 2e-4  # policy AdamW learning rate
    critic_lr: float = 1e-3  # value model AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (per model)
    # --- output
    out: str = "runs/train"  # output directory (metrics.jsonl, samples.jsonl, config.json, checkpoint)
    checkpoint_every: int = 10  # updates between checkpoints (and at the end)
    samples_every: int = 10  # updates between sample dumps into samples.jsonl
    report_to: list[str] | None = field(default=None, metadata={"help": (
        'where metrics and alerts also go: any of "jsonl", "csv", "tensorboard", "wandb", "mlflow" '
        '(metrics.jsonl is always written)')})

    def __post_init__(self):
        from ..kl.estimators import ESTIMATOR_ALIASES
        from .attention import CHOICES as ATTENTION_CHOICES
        from .importance import CORRECTIONS
        from .sampling import SAMPLERS

        self.kl_estimator = ESTIMATOR_ALIASES.get(self.kl_estimator, self.kl_estimator)  # verl's names: kl, mse, low_var_kl
        choices = {
            "kl_in": ("reward", "loss"),
            "kl_estimator": ("k1", "k2", "k3", "abs", "exact"),
            "reference": ("initial", "base"),
            "controller": ("fixed", "adaptive", "proportional", "pid"),
            "kl_unit": ("token-mean", "seq-sum"),
            "advantage": ("gae", "group"),
            "clamp_gradient": ("zero", "pass"),
            "sampler": SAMPLERS,
            "rollout_correction": CORRECTIONS,
            "attn_implementation": ATTENTION_CHOICES,
            "controller_estimator": ("k1", "k3"),
        }
        if self.report_to is not None:
            sinks = ("jsonl", "csv", "tensorboard", "wandb", "mlflow")
            if isinstance(self.report_to, str) or not all(s in sinks for s in self.report_to):
                raise ValueError(f"config report_to must be a list of {', '.join(map(repr, sinks))}; got {self.report_to!r}")
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"config {name} must be one of {', '.join(map(repr, valid))}; got {value!r}")
        positive_ints = ("steps", "batch_size", "group_size", "max_new_tokens", "ppo_epochs", "minibatches", "horizon", "checkpoint_every", "samples_every")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config {name} must be a positive int, got {value!r}")
        for name in ("temperature", "lr", "critic_lr", "clip_range", "value_clip", "max_grad_norm", "target_kl"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or value != value or value == float("inf"):
                raise ValueError(f"config {name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.kl_coef, (int, float)) and 0 <= self.kl_coef < float("inf")):
            raise ValueError(f"config kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if self.log_ratio_clamp is not None and not (
            isinstance(self.log_ratio_clamp, (int, float)) and not isinstance(self.log_ratio_clamp, bool)
            and 0 < self.log_ratio_clamp < float("inf")
        ):
            raise ValueError(f"config log_ratio_clamp must be null (off) or a finite number > 0, got {self.log_ratio_clamp!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"config lora_rank must be an int >= 0 (0 = full fine-tune), got {self.lora_rank!r}")
        if self.lora_alpha is not None and not (
            isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool) and 0 < self.lora_alpha < float("inf")
        ):
            raise ValueError(f"config lora_alpha must be null (2 * lora_rank) or a finite number > 0, got {self.lora_alpha!r}")
        if self.pid_gains is not None and not (
            isinstance(self.pid_gains, (list, tuple)) and len(self.pid_gains) == 3
            and all(isinstance(g, (int, float)) and not isinstance(g, bool) and 0 <= g < float("inf") for g in self.pid_gains)
        ):
            raise ValueError(f"config pid_gains must be null or three finite numbers >= 0 [kp, ki, kd], got {self.pid_gains!r}")
        if isinstance(self.pid_warmup, bool) or not isinstance(self.pid_warmup, int) or self.pid_warmup < 0:
            raise ValueError(f"config pid_warmup must be an int >= 0 (updates; 0 = off), got {self.pid_warmup!r}")
        if not (isinstance(self.pid_smoothing, (int, float)) and not isinstance(self.pid_smoothing, bool)
                and 0 <= self.pid_smoothing < 1):
            raise ValueError(f"config pid_smoothing must be a number in [0, 1), got {self.pid_smoothing!r}")
        if not (isinstance(self.pid_min_kl_coef, (int, float)) and not isinstance(self.pid_min_kl_coef, bool)
                and 0 <= self.pid_min_kl_coef < float("inf")):
            raise ValueError(f"config pid_min_kl_coef must be a finite number >= 0, got {self.pid_min_kl_coef!r}")
        if self.controller == "pid" and self.pid_min_kl_coef > self.kl_coef:
            raise ValueError(f"config pid_min_kl_coef ({self.pid_min_kl_coef!r}) must be <= kl_coef ({self.kl_coef!r}), "
                             "the pid controller's starting beta")
        from ..kl.mismatch import check_band, check_cap

        check_cap(self.is_cap, "config is_cap")
        check_band(self.is_band, "config is_band")
        if self.vllm_python is not None and not (isinstance(self.vllm_python, str) and self.vllm_python):
            raise ValueError(f"config vllm_python must be null ($KLBELT_VLLM_PYTHON) or the path of a python, got {self.vllm_python!r}")
        if self.sampler == "vllm" and (self.top_k or self.top_p < 1.0):
            raise ValueError(f"config sampler 'vllm' needs top_k 0 and top_p 1.0, got top_k={self.top_k!r}, top_p={self.top_p!r} "
                             "(klbelt's vLLM worker returns the raw model's log-probs, not those of the filtered distribution it "
                             "draws from; use sampler 'policy', 'bf16' or 'bf16-merged' with top_k/top_p)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"config top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"config top_p must be a number in (0, 1] (1.0 = off), got {self.top_p!r}")
        if isinstance(self.ref_sync_every, bool) or not isinstance(self.ref_sync_every, int) or self.ref_sync_every < 0:
            raise ValueError(f"config ref_sync_every must be an int >= 0 (0 = never), got {self.ref_sync_every!r}")
        if not isinstance(self.kl_ratio_correction, bool):
            raise ValueError(f"config kl_ratio_correction must be true or false, got {self.kl_ratio_correction!r}")
        if not isinstance(self.fused_head, bool):
            raise ValueError(f"config fused_head must be true or false, got {self.fused_head!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"config bf16 must be true or false, got {self.bf16!r}")
        if not isinstance(self.bf16_base, bool):
            raise ValueError(f"config bf16_base must be true or false, got {self.bf16_base!r}")
        if self.bf16_base and self.sampler == "policy":
            raise ValueError("config bf16_base needs a sampler other than 'policy' ('bf16', 'bf16-merged' or 'vllm'): the policy "
                             "sampler and its fp32 reference run the base outside bf16 autocast, got sampler='policy'")
        if self.batch_size % self.group_size:
            raise ValueError(f"config batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size})")
        if self.advantage == "group" and self.group_size < 2:
            raise ValueError("config advantage='group' needs group_size >= 2 (several samples per prompt)")
        if self.batch_size % self.minibatches:
            raise ValueError(f"config batch_size ({self.batch_size}) must be a multiple of minibatches ({self.minibatches})")
        if self.kl_in == "loss" and self.kl_estimator not in ("k2", "k3"):
            raise ValueError("config kl_in='loss' needs kl_estimator 'k2' or 'k3' (with kl_ratio_correction both give the gradient "
                             f"of KL(pi||ref); k3 without it, on-policy, that of KL(ref||pi)), got {self.kl_estimator!r}")

    @classmethod
    def from_dict(cls, values: dict, notes: list | None = None) -> "TrainConfig":
        """Fields by klbelt's names or TRL/verl aliases (``beta``, ``num_generations``, ...);
        strings such as ``"1e-6"`` are read as the field's type. Each alias used adds a line to ``notes``."""
        from .fields import canonical

        values, said = canonical(cls, values)
        if notes is not None:
            notes.extend(said)
        return cls(**values)

    @classmethod
    def field_help(cls, name: str) -> str:
        """The help text of one field (from its comment above, or ``metadata["help"]``)."""
        from .fields import field_help

        return field_help(cls, name)

    @classmethod
    def from_file(cls, path: str | Path, notes: list | None = None) -> "TrainConfig":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"config file {path}: cannot be read ({exc.strerror or exc})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                from .fields import load_yaml

                values = load_yaml(text)  # YAML 1.2 numbers: 1e-6 is a float
            else:
                values = json.loads(text)
        except ImportError:
            raise
        except Exception as exc:
            raise ValueError(f"config file {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({exc})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: expected a mapping of keys to values, got {type(values).__name__}")
        return cls.from_dict(values, notes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
