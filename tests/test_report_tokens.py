"""The report's text view: every response token in its own span, shaded by the KL the trainer logged."""

from __future__ import annotations

import json
from dataclasses import replace
from html.parser import HTMLParser

import pytest
import torch

from klbelt.cli.main import main
from klbelt.demo.task import DEMO_CONFIG
from klbelt.monitor.token_report import chosen_steps, token_section_html, top_tokens
from klbelt.rl.token_log import token_strings
from klbelt.rl.trainer import train

pytest.importorskip("matplotlib")

STEPS, BATCH = 3, 4  # a batch of 4: token_kl.jsonl logs every response, so its mean is the step's metric


class Spans(HTMLParser):
    """Collects each ``.resp`` block's prompt, token spans (text, data-kl) and step."""

    def __init__(self):
        super().__init__()
        self.responses, self._in_tok, self._in_prompt = [], False, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "")
        if tag == "div" and cls == "resp":
            self.responses.append({"step": int(a["data-step"]), "prompt": "", "tokens": [], "kl": []})
        elif tag == "span" and cls == "tok":
            self._in_tok = True
            self.responses[-1]["tokens"].append("")
            self.responses[-1]["kl"].append(float(a["data-kl"]))
        elif tag == "span" and cls == "prompt":
            self._in_prompt = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_tok = self._in_prompt = False

    def handle_data(self, data):
        if self._in_tok:
            self.responses[-1]["tokens"][-1] += data
        elif self._in_prompt:
            self.responses[-1]["prompt"] += data


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


PROMPTS = ["The weather today is", "My friend told me", "At the market we", "Late in the evening"]


def _exclaims(texts):
    """A cheap proxy reward: exclamation marks (the tiny model's hack), so the policy moves within 3 steps."""
    return torch.tensor([float(t.count("!")) for t in texts])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """3 PPO updates of the built-in tiny model (the demo's trainer and model, a batch of 4)."""
    from klbelt.demo.model import load_demo_model

    out = tmp_path_factory.mktemp("tokrun")
    model, tok = load_demo_model()
    cfg = replace(DEMO_CONFIG, steps=STEPS, batch_size=BATCH, max_new_tokens=10, checkpoint_every=100, samples_every=1,
                  lr=1e-3, out=str(out))
    train(cfg, model, tok, PROMPTS, _exclaims, warn_alerts=False)
    return out


@pytest.mark.slow
def test_token_file_tokens_concatenate_to_the_sampled_text_and_average_to_the_kl_metric(tiny_run):
    tokens = _jsonl(tiny_run / "token_kl.jsonl")
    metrics = _jsonl(tiny_run / "metrics.jsonl")
    samples = {r["step"]: r for r in _jsonl(tiny_run / "samples.jsonl")}
    assert [r["step"] for r in tokens] == list(range(STEPS))
    for rec, met in zip(tokens, metrics):
        assert len(rec["responses"]) == BATCH
        for i, resp in enumerate(rec["responses"]):
            assert len(resp["tokens"]) == len(resp["kl"]) > 0
            assert "".join(resp["tokens"]) == resp["text"]
            if rec["step"] in samples:  # the trainer's own batch decode of the same response
                assert resp["text"] == samples[rec["step"]]["responses"][i]
        # the metric is the token mean over the whole batch, and the batch is all logged here
        all_kl = [v for resp in rec["responses"] for v in resp["kl"]]
        assert sum(all_kl) / len(all_kl) == pytest.approx(met["kl"], rel=1e-4, abs=1e-6)
        assert max(all_kl) == pytest.approx(met["kl_max"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_report_shows_one_span_per_token_with_the_logged_kl(tiny_run):
    page = (tiny_run / "report.html").read_text(encoding="utf-8")
    parser = Spans()
    parser.feed(page)
    tokens = {r["step"]: r for r in _jsonl(tiny_run / "token_kl.jsonl")}
    metrics = _jsonl(tiny_run / "metrics.jsonl")
    top = max(metrics, key=lambda r: r["kl"])["step"]
    shown_steps = sorted({r["step"] for r in parser.responses})
    assert shown_steps == sorted({0, STEPS - 1, top})
    assert len(parser.responses) == BATCH * len(shown_steps)
    seen = {}
    for shown in parser.responses:
        seen.setdefault(shown["step"], []).append(shown)
    for step, shown_list in seen.items():
        for shown, logged in zip(shown_list, tokens[step]["responses"]):
            assert shown["tokens"] == logged["tokens"]  # one span per token, text unescaped back exactly
            assert shown["kl"] == logged["kl"]  # the value each span carries is the logged one
            assert shown["prompt"] == logged["prompt"]
    assert "The run's highest-KL tokens" in page


@pytest.mark.slow
def test_klbelt_report_on_the_run_folder_includes_the_token_section(tiny_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(tiny_run), "--out", str(out)]) == 0
    assert "id='token-kl'" in out.read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_of_a_run_without_token_file_has_no_token_section(tiny_run, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text((tiny_run / "metrics.jsonl").read_text())
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path), "--out", str(out)]) == 0
    assert "id='token-kl'" not in out.read_text(encoding="utf-8")


def test_token_strings_concatenate_to_the_decoded_text_across_split_characters():
    from klbelt.demo.model import load_demo_model

    _, tok = load_demo_model()
    text = "Über café naïve — 日本 ok!!!"
    ids = tok(text)["input_ids"]
    assert "".join(tok.decode([i]) for i in ids) != text  # decoding one token at a time breaks characters
    pieces = token_strings(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_highest_kl_tokens_and_chosen_steps_are_found_by_brute_force():
    records = [
        {"step": s, "responses": [{"prompt": "p", "text": "", "tokens": [f"t{s}{i}" for i in range(5)],
                                   "kl": [float(torch.randn(()).item()) for _ in range(5)]}]}
        for s in range(6)
    ]
    metrics = [{"step": s, "kl": [0.1, 0.5, 0.2, 0.9, 0.3, 0.0][s]} for s in range(6)]
    assert [r["step"] for _, r in chosen_steps(records, metrics)] == [0, 3, 5]
    flat = sorted(((kl, t) for r in records for resp in r["responses"] for t, kl in zip(resp["tokens"], resp["kl"])), reverse=True)
    assert [t["token"] for t in top_tokens(records, n=4)] == [t for _, t in flat[:4]]
    assert token_section_html([], metrics) == ""
    html = token_section_html([{"step": 0, "responses": [{"prompt": "<b>", "text": "&", "tokens": ["&"], "kl": [0.5]}]}])
    assert "<b>" not in html and "&lt;b&gt;" in html  # text is escaped
