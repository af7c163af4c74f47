"""What a config field means and how its value is read, generic over a dataclass's fields.

Each field's help text lives in one place: ``field(metadata={"help": ...})`` if
given, otherwise the ``# comment`` after the field in the class body (read from
the source once). Values from a file or the command line are read as YAML 1.2
scalars (``1e-6`` is a number, ``null``/``true``/``[0.5, 2]`` work), coerced to
the field's annotated type, and then validated by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import tokenize
import typing

# Names users bring from TRL (PPOConfig / GRPOConfig) and verl (ppo_trainer.yaml),
# mapped to klbelt's field names. Only unambiguous ones: same quantity, same unit.
ALIASES = {
    "beta": "kl_coef",  # TRL GRPOConfig
    "kl_loss_coef": "kl_coef",  # verl actor
    "kl_penalty": "kl_estimator",  # verl algorithm
    "kl_loss_type": "kl_estimator",  # verl actor
    "num_generations": "group_size",  # TRL GRPOConfig
    "learning_rate": "lr",  # TRL / transformers
    "num_ppo_epochs": "ppo_epochs",  # TRL PPOConfig
    "num_mini_batches": "minibatches",  # TRL PPOConfig
    "cliprange": "clip_range",  # TRL PPOConfig
    "clip_ratio": "clip_range",  # verl actor
    "epsilon": "clip_range",  # TRL GRPOConfig
    "cliprange_value": "value_clip",  # TRL PPOConfig
    "entropy_coeff": "entropy_coef",  # verl actor
    "max_completion_length": "max_new_tokens",  # TRL GRPOConfig
    "response_length": "max_new_tokens",  # TRL PPOConfig, verl data
    "output_dir": "out",  # TRL / transformers
    "save_steps": "checkpoint_every",  # TRL / transformers
    "grad_clip": "max_grad_norm",  # verl actor
    "model_name_or_path": "model",  # TRL scripts
    "total_steps": "steps",
    "init_kl_coef": "kl_coef",  # TRL < 0.12 PPOConfig
    "use_bias_correction_kl": "kl_ratio_correction",  # TRL GRPOConfig
}
# TRL/verl keys with no one-to-one klbelt field: the message names the klbelt key to use instead.
INSTEAD = {
    "per_device_train_batch_size": "use batch_size (sequences per update, over all processes)",
    "train_batch_size": "use batch_size (sequences per update, over all processes)",
    "gradient_accumulation_steps": "use batch_size and minibatches (batch_size sequences per update, split into minibatches)",
    "num_train_epochs": "use steps (PPO updates)",
    "max_steps": "use steps (PPO updates)",
    "use_kl_loss": "use kl_in: loss (KL in the loss, GRPO-style) or kl_in: reward",
    "use_kl_in_reward": "use kl_in: reward (or kl_in: loss)",
    "adap_kl_ctrl": "use controller: adaptive (true) or controller: fixed (false)",
    "kl_ctrl": "use controller (fixed, adaptive, proportional, pid), target_kl and horizon",
    "rollout_n": "use group_size",
    "n": "use group_size (samples per prompt)",
}
# Keys that are gone: key -> (the old default, which is dropped silently so old run folders
# still resume, and the message any other value gets instead of "unknown key").
REMOVED = {
    "eval_prompts": (0, "was reserved and never did anything, and has been removed (samples.jsonl holds "
                     "generations every samples_every updates); delete the key"),
}
# Estimator names from TRL/verl, for fields that name an estimator.
ESTIMATOR_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


@functools.lru_cache(maxsize=None)
def _comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of the class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app): help falls back to metadata only
        return {}
    out, line_names = {}, {}
    pattern = re.compile(r"^\s+([A-Za-z_]\w*)\s*:")
    for i, line in enumerate(source.splitlines(), 1):
        m = pattern.match(line)
        if m:
            line_names[i] = m.group(1)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in line_names and tok.start[1] > 0:
            out.setdefault(line_names[tok.start[0]], tok.string.lstrip("#").strip())
    return out


def field_help(cls, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls`` (metadata first, then the comment)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help") or _comments(cls).get(name, "")
    raise KeyError(name)


def field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _yaml():
    try:
        import yaml
    except ImportError:
        raise ImportError("reading YAML needs PyYAML: pip install 'klbelt[train]'") from None
    return yaml


@functools.lru_cache(maxsize=1)
def yaml_loader():
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-6``, ``5e3`` and ``.5`` are numbers, not strings."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    float_re = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
                          r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in list("-+0123456789."):
        resolvers = [r for r in Loader.yaml_implicit_resolvers.get(first, []) if r[0] != "tag:yaml.org,2002:float"]
        Loader.yaml_implicit_resolvers[first] = resolvers
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return Loader


def load_yaml(text: str):
    return _yaml().load(text, Loader=yaml_loader())


def dump_yaml(values: dict) -> str:
    return _yaml().safe_dump(values, sort_keys=False, default_flow_style=False, width=1000)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(cls, name: str, value, *, where: str = "config"):
    """``value`` for field ``name``: strings read as YAML scalars where the field is not a string,
    ints accepted for floats. Anything else is left for the dataclass's own validation."""
    tp = field_types(cls)[name]
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args and typing.get_origin(tp) is typing.Union or optional else tp
    if isinstance(value, str) and base is not str:
        try:
            value = load_yaml(value)
        except Exception:
            raise ValueError(f"{where} {name}: cannot read {value!r} as {_type_name(tp)}") from None
    if value is None:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def canonical(cls, values: dict, *, where: str = "config") -> tuple[dict, list[str]]:
    """Resolve aliases and removed keys; refuse unknown keys with the closest valid one.

    Returns ``(values by canonical name, notes)`` where each note says which
    alias was read as which klbelt key.
    """
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a mapping of keys to values, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    out, notes, source = {}, [], {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {key!r}")
        name = key.replace("-", "_") if key.replace("-", "_") in names else key
        if name not in names and name in ALIASES:
            name = ALIASES[key]
            notes.append(f"{where} key {key!r} read as klbelt's {name!r}")
        if name not in names:
            if key in INSTEAD:
                raise ValueError(f"{where} key {key!r} has no klbelt equivalent of the same meaning: {INSTEAD[key]}")
            if key in REMOVED:
                if value == REMOVED[key][0]:
                    continue
                raise ValueError(f"{where} key {key!r} {REMOVED[key][1]}")
            close = difflib.get_close_matches(key, names + list(ALIASES), n=1, cutoff=0.6)
            valid = f"valid keys: {', '.join(names)}"
            hint = f"; did you mean {ALIASES.get(close[0], close[0])!r}? ({valid})" if close else f"; {valid}"
            raise ValueError(f"unknown {where} key {key!r}{hint}")
        if name in out:
            raise ValueError(f"{where} sets {name!r} twice (as {source[name]!r} and {key!r})")
        source[name] = key
        value = coerce(cls, name, value, where=where)
        if name == "kl_estimator" and value in ESTIMATOR_ALIASES:
            notes.append(f"{where} {name} {value!r} read as klbelt's {ESTIMATOR_ALIASES[value]!r}")
            value = ESTIMATOR_ALIASES[value]
        out[name] = value
    return out, notes
