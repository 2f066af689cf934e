"""The demo end to end with a micro budget: every stage runs, the report has every section, reruns skip."""

import json
from html.parser import HTMLParser

from personae.demo import run_demo
from personae.eval.report import SECTIONS
from tests.conftest import MICRO


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings, self.images, self._in = [], 0, None

    def handle_starttag(self, tag, attrs):
        self._in = tag if tag in ("h2",) else None
        self.images += tag == "img"

    def handle_data(self, data):
        if self._in == "h2" and data.strip():
            self.headings.append(data.strip())


def test_micro_demo_runs_every_stage_and_reruns_skip(tmp_path, capsys):
    overrides = MICRO + ["train.steps=3", "finetune.train.steps=3"]
    summary = run_demo(tmp_path, scenes=300, overrides=overrides, progress=False)
    first = capsys.readouterr().out
    assert "[5/5] evaluate role-play ..." in first and "== summary" in first
    assert summary["retrieval"]["pairs"] > 0 and {"train", "heldout"} <= set(summary["roleplay"])
    parser = _Collect()
    parser.feed((tmp_path / "report.html").read_text())
    assert set(SECTIONS.values()) <= set(parser.headings)
    assert parser.images >= 4
    run_demo(tmp_path, scenes=300, overrides=overrides, progress=False)
    again = capsys.readouterr().out
    assert again.count("already done, skipped") == 5
    assert json.loads((tmp_path / "demo.json").read_text())["retrieval"] == summary["retrieval"]
