"""RewardModel: a sequence-classification reward read at the last valid token, from ids or from texts."""

from __future__ import annotations

import pytest
import torch

from klbelt.rl import RewardModel
from klbelt.rl.config import TrainConfig
from klbelt.rl.rollout import Rollout
from klbelt.rl.trainer import train
from tiny_models import tiny_gpt2, word_tokenizer

WORDS = ["a", "b", "c", "d", "e"]


def _classifier(vocab_size: int, pad_token_id: int, num_labels: int = 1, seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2, num_labels=num_labels,
                     pad_token_id=pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(cfg).eval()


def _alone(model, ids: list[int]) -> float:
    """The model's own score of one unpadded sequence (its last token)."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


def test_score_rollout_reads_the_last_valid_token_with_left_padding_and_early_eos(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    model = _classifier(len(tok), pad)
    # row 0: a left-padded prompt and an EOS after one token (then padding); row 1: full length
    sequences = torch.tensor([[pad, pad, 0, 1, eos, pad], [2, 3, 4, 0, 1, 2]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    response_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    roll = Rollout(sequences, attention, 3, response_mask, torch.zeros(2, 3))
    scores = RewardModel(model, tok).score_rollout(roll)
    expected = [_alone(model, [0, 1, eos]), _alone(model, [2, 3, 4, 0, 1, 2])]
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_texts_are_scored_at_their_last_token_whatever_the_padding_side(tok, side):
    model = _classifier(len(tok), tok.pad_token_id, seed=1)
    tok.padding_side = side
    try:
        scores = RewardModel(model, tok)(["a b c", "d", "e e a b"])
    finally:
        tok.padding_side = "left"
    expected = [_alone(model, tok(t)["input_ids"]) for t in ["a b c", "d", "e e a b"]]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-5, rtol=0)


def test_another_tokenizer_scores_the_decoded_prompt_and_response(tok):
    other = word_tokenizer(["e", "d", "c", "b", "a", "z"])  # same words, other ids
    model = _classifier(len(other), other.pad_token_id, seed=2)
    scorer = RewardModel(model, other, policy_tokenizer=tok)
    assert not scorer.shares_tokenizer
    pad = tok.pad_token_id
    sequences = torch.tensor([[pad, 0, 1, 2], [3, 4, 0, pad]])
    roll = Rollout(sequences, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), 2, torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.zeros(2, 2))
    expected = scorer(["a b c", "d e a"])
    torch.testing.assert_close(scorer.score_rollout(roll), expected)
    assert RewardModel(model, other, policy_tokenizer=word_tokenizer(["e", "d", "c", "b", "a", "z"])).shares_tokenizer


def test_a_classifier_with_more_than_one_label_is_refused(tok):
    with pytest.raises(ValueError, match="num_labels=1.*got num_labels=2"):
        RewardModel(_classifier(len(tok), tok.pad_token_id, num_labels=2), tok)


def test_texts_must_be_a_list_of_strings(tok):
    with pytest.raises(TypeError, match="list of str"):
        RewardModel(_classifier(len(tok), tok.pad_token_id), tok)("a b")


def test_the_trainer_scores_token_ids_through_score_rollout(tmp_path, tok):
    scorer = RewardModel(_classifier(len(tok), tok.pad_token_id), tok)
    calls = []
    original = scorer.score_rollout
    scorer.score_rollout = lambda roll: calls.append(roll.sequences.shape) or original(roll)
    cfg = TrainConfig(steps=2, batch_size=4, max_new_tokens=3, controller="fixed", checkpoint_every=100, out=str(tmp_path))
    history = train(cfg, tiny_gpt2(len(tok)), tok, ["a", "b c"], scorer)
    assert len(calls) == 2 and all(shape[0] == 4 for shape in calls)
    assert all(abs(h["reward"]) < 100 for h in history)
