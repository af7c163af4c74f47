"""`klbelt report`: a self-contained HTML page whose every image decodes, from a JSONL round trip."""

from __future__ import annotations

import base64
import io
import math
import random
from html.parser import HTMLParser

import pytest
import torch

from klbelt import KLMonitor
from klbelt.cli.main import main

pytest.importorskip("matplotlib")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headings, self.external, self._h2 = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link") or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append(tag)
        self._h2 = tag == "h2"

    def handle_data(self, data):
        if self._h2:
            self.headings.append(data.strip())
            self._h2 = False


def _hacking_run(log_dir, steps=80):
    """A monitored run whose proxy reward keeps rising while the gold reward turns down and KL runs away."""
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    with KLMonitor(log_dir, warn=False) as monitor:
        for t in range(steps):
            kl = (0.002 * t + 0.01) * torch.rand(8, 16, generator=gen) * 2
            mask = torch.ones(8, 16)
            mask[:, 12:] = 0
            gold = 0.5 * math.sin(t / 25) + 0.02 * rng.gauss(0, 1)
            monitor.log_step(t, kl=kl, mask=mask, kl_coef=0.05, reward=0.02 * t + 0.02 * rng.gauss(0, 1),
                             gold_reward=gold, entropy=3.0 - 0.02 * t, distinct_2=0.8)
    return monitor


def _decode_png(data_uri):
    import matplotlib.image

    assert data_uri.startswith("data:image/png;base64,")
    return matplotlib.image.imread(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1])), format="png")


def test_jsonl_round_trip_to_a_self_contained_report_whose_images_all_decode(tmp_path, capsys):
    monitor = _hacking_run(tmp_path / "run")
    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = _Page()
    page.feed(out.read_text())
    assert page.external == []  # opens offline: no scripts, stylesheets or remote images
    assert len(page.images) == 5
    for uri in page.images:
        img = _decode_png(uri)
        assert img.shape[0] > 100 and img.shape[1] > 200 and img.std() > 0  # a real, non-blank picture
    for title in ("Health verdicts", "KL over time", "beta over time", "Proxy and gold reward",
                  "Gold reward vs KL", "Per-token KL distribution"):
        assert title in page.headings
    html = out.read_text()
    fired = {a.rule: a.step for a in monitor.alerts}
    assert fired, "the synthetic run should raise alerts"
    for rule, step in fired.items():
        assert rule in html and str(step) in html
    assert "unhealthy" in html


def test_report_of_a_run_without_gold_or_beta_says_what_is_missing(tmp_path):
    with KLMonitor(tmp_path, warn=False) as monitor:
        for t in range(5):
            monitor.log_metrics(t, {"kl_seq": 1.0 + t})
    assert main(["report", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Not in this log" in html and "no gold_reward" in html and "no kl_coef" in html
    assert "no per-token band" in html


def test_report_on_an_unreadable_file_prints_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text("garbage\n")
    assert main(["report", str(bad), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bad) in err
    assert not (tmp_path / "r.html").exists()
