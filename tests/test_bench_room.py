"""The benchmark room: no import cycle among ``klbelt.bench`` modules, and TRL's PPO driven on the English work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import klbelt.bench

BENCH = Path(klbelt.bench.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(BENCH.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _bench_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``klbelt.bench`` modules that ``path`` imports anywhere (top level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = (base + "." + node.module if node.module else base) if node.level else node.module
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
            if nxt not in state:
                found = visit(nxt, stack + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def _bench_graph() -> dict[str, set[str]]:
    files = sorted(BENCH.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _bench_imports(p, modules) for p in files}


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_relative_imports_inside_functions():
    graph = _bench_graph()
    assert "klbelt.bench._memory" in graph["klbelt.bench.kernels"]  # ``from . import _memory`` inside run()
    assert "klbelt.bench.work" in graph["klbelt.bench.baselines.trl"]  # ``from ..work import ...``


def test_no_bench_module_imports_one_that_imports_it_back():
    assert _cycle(_bench_graph()) is None


def test_every_bench_module_imports_in_a_fresh_interpreter():
    code = "\n".join(f"import {name}" for name in sorted(_bench_graph()))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------- TRL's PPO on the English work


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama causal LM (random init) with a BPE tokenizer trained on the shipped English prompts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from klbelt.demo.english import english_prompts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(english_prompts("train") + english_prompts("eval"), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def test_vader_reward_model_gives_trl_the_proxy_of_each_response(tiny_llama):
    import torch

    pytest.importorskip("trl")
    from transformers import AutoTokenizer
    from trl.experimental.utils import get_reward

    from klbelt.bench.baselines.trl import vader_reward_model
    from klbelt.demo.rewards import proxy_reward

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    responses = ["What a wonderful, happy day!", "This is terrible and sad.", "The box is on the table."]
    R = 12
    queries = tok(["Tell me", "Once upon a time there", "Say"], return_tensors="pt", padding=True)["input_ids"]
    rows = []
    for text in responses:  # right-padded to R tokens, as TRL leaves a response that stopped early
        ids = tok(text)["input_ids"][:R]
        rows.append(ids + [tok.pad_token_id] * (R - len(ids)))
    query_responses = torch.cat([queries, torch.tensor(rows)], 1)
    _, scores, _ = get_reward(vader_reward_model(tok, R), query_responses, tok.pad_token_id, queries.shape[1])
    expected = proxy_reward([tok.decode(tok(t)["input_ids"][:R]) for t in responses])
    torch.testing.assert_close(scores, expected.float())
    assert len(set(scores.tolist())) == 3  # the three texts score apart: the test can tell them from one another


@pytest.mark.slow
def test_trl_ppo_does_the_english_work_with_lora_on_policy_and_critic_and_full_length_responses(tiny_llama):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    from klbelt.bench.baselines.trl import ppo_english
    from klbelt.demo.task import ENGLISH_DEMO_CONFIG

    result = ppo_english({"model": str(tiny_llama), "warmup": 1, "updates": 1, "bf16": False, "threads": 1})
    cfg = ENGLISH_DEMO_CONFIG
    assert len(result["intervals"]) == 1 and result["intervals"][0] > 0
    assert result["response_tokens_per_update"] == cfg.batch_size * cfg.max_new_tokens  # every response full length
    # LoRA rank r on the 7 projections of each of the 2 layers, policy and critic alike, plus the critic's head
    h, i, r = 32, 64, cfg.lora_rank
    per_layer = r * ((h + h) * 4 + (h + i) * 2 + (i + h))  # q, k, v, o: h->h (2 kv heads of 16 = h); gate, up: h->i; down: i->h
    assert result["trainable_parameters"] == 2 * 2 * per_layer + h


def test_english_row_compares_klbelt_with_the_faster_trl_trainer_and_the_floor():
    import types

    from klbelt.bench import real_model

    args = types.SimpleNamespace(model="m", threads=2, runs=1, warmup=1, updates=2)
    results = {
        "klbelt": [{"intervals": [2.0, 3.0, 2.0], "peak_rss_mb": 900.0}],
        "trl_ppo": [{"intervals": [9.0, 9.0], "peak_rss_mb": 1500.0, "trl_version": "1.0.0", "response_tokens_per_update": 384}],
        "trl_grpo": [{"intervals": [5.0, 7.0, 6.0], "peak_rss_mb": 1200.0, "trl_version": "1.16.0"}],
    }
    floor = {"seconds_per_update": 1.6, "parts": {"generation": 1.0, "ref_forward": 0.6}}
    row = real_model._row(args, {"bf16": True}, results, floor)
    assert row["klbelt_s_per_update"] == 2.0 and row["trl_grpo_s_per_update"] == 6.0 and row["trl_ppo_s_per_update"] == 9.0
    assert row["speedup_vs_faster_trl"] == pytest.approx(3.0)  # GRPO is the faster TRL trainer: 6 / 2
    assert row["speedup_vs_trl_ppo"] == pytest.approx(4.5)
    assert row["floor_ratio"] == pytest.approx(1.25)
    from klbelt.demo.task import ENGLISH_DEMO_CONFIG as cfg

    # the bench times the demo's own update: its batch x response length tokens (24 x 24 since issue 22)
    assert row["klbelt_tokens_per_s"] == pytest.approx(cfg.batch_size * cfg.max_new_tokens / 2.0)
    assert (row["trl_version"], row["trl_ppo_version"]) == ("1.16.0", "1.0.0")


def test_the_english_floor_runs_the_demos_choices_on_a_llama(tiny_llama, monkeypatch):
    """The floor's passes on a tiny Llama with the demo's config: klbelt_fp32 attention, and its sampling
    through klbelt's decode loop over the packed copy (the path the demo samples with)."""
    from klbelt.bench.floor import english_floor
    from klbelt.rl.lean_decode import LeanDecoder
    from klbelt.rl.lora import bf16_supported

    import functools

    one_token_steps = []
    forward = LeanDecoder.forward

    @functools.wraps(forward)  # (the signature names its cache argument)
    def counted(self, input_ids, *args, **kwargs):
        one_token_steps.append(input_ids.shape[1] == 1)
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(LeanDecoder, "forward", counted)
    result = english_floor({"model": str(tiny_llama), "warmup": 1, "updates": 1, "bf16": bf16_supported(), "threads": 1,
                            "floor_repeats": 1})
    assert set(result["parts"]) == {"generation", "ref_forward", "policy_forward_backward", "optimizer_step"}
    assert all(v > 0 for v in result["parts"].values()) and result["seconds_per_update"] == pytest.approx(sum(result["parts"].values()))
    assert sum(one_token_steps) >= 23  # the decode steps of its sampling went through klbelt's decode loop
