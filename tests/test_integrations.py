"""KLMonitorCallback inside a real (tiny, CPU, offline) TRL GRPOTrainer; readers on the files it leaves."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("tensorboard")


def _tiny_model_dir(path):
    """A randomly initialised 2-layer GPT-2 and a word-level tokenizer, built locally (no hub)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.mark.slow
def test_callback_feeds_a_real_trl_grpo_run_and_writes_the_report(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from klbelt.integrations import KLMonitorCallback
    from klbelt.monitor import read_run

    model_dir = tmp_path / "model"
    tokenizer = _tiny_model_dir(model_dir)
    prompts = Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 61}" for j in range(4)) for i in range(24)]})

    def reward(completions, **kwargs):
        return [float(c.count("w3")) for c in completions]

    alerts = []
    callback = KLMonitorCallback(on_alert=alerts.append, warn=False)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=8, beta=0.1, learning_rate=1e-2, logging_steps=1, save_strategy="steps",
        save_steps=3, report_to=["tensorboard"], use_cpu=True,
        bf16=False, disable_tqdm=True, seed=0,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=[callback])
    trainer.train()

    # the callback saw every logged step, with GRPO's per-token kl under klbelt's name
    history = callback.monitor.history
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert all(r["kl"] >= 0 and "reward" in r and "entropy" in r for r in history)
    assert callback.report_path == tmp_path / "out" / "klbelt" / "report.html"
    assert "KL over time" in callback.report_path.read_text()
    assert read_run(tmp_path / "out" / "klbelt").records == history

    # the readers turn TRL's own files into the same history
    state = read_run(tmp_path / "out")  # no trainer_state.json at the top: the latest checkpoint's
    assert state.format == "trainer_state" and state.path.parent.name == "checkpoint-6"
    (event_file,) = (tmp_path / "out").rglob("events.out.tfevents.*")  # where transformers put it
    tb = read_run(event_file.parent)
    for run in (state, tb):
        assert [r["step"] for r in run.records] == [1, 2, 3, 4, 5, 6]
        for got, want in zip(run.records, history):
            assert got["kl"] == pytest.approx(want["kl"], rel=1e-5)
            assert got["reward"] == pytest.approx(want["reward"], rel=1e-5)
