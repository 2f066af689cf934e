"""The demo end to end with a micro budget: every stage runs, the report has every section, reruns skip."""

import json
from html.parser import HTMLParser

from personae.app.budgets import Budget
from personae.app.demo import run_demo
from personae.eval.report import SECTIONS
from tests.conftest import MICRO

MICRO_DEMO = Budget("micro", scenes=300, pretrain_steps=3, finetune_steps=3, meta_steps=2, roleplay_limit=4,
                    adapt_ks=(1, 5), adapt_steps=(0, 1, 10), adapt_query=1)


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
    overrides = MICRO + ["meta.meta_batch=2", "meta.support=2", "meta.query=2", "meta.inner_steps=1",
                         "meta.train.warmup_steps=1", "meta.train.log_every=1"]
    summary = run_demo(tmp_path, budget=MICRO_DEMO, overrides=overrides, progress=False)
    first = capsys.readouterr().out
    assert "[10/10] adapt to each held-out character ..." in first and "== summary" in first
    assert "image worth: reply-token loss in nats" in first and "  object names " in first
    assert "adaptation to held-out characters (k=5" in first and "personae chat" in first
    assert summary["retrieval"]["pairs"] > 0 and {"train", "heldout"} <= set(summary["roleplay"])
    assert set(summary["adaptation"]["methods"]) == {"meta", "multitask", "none"}
    assert summary["grounding"]["loss"]["object names"]["n"] > 0
    adapted = json.loads((tmp_path / "meta" / "eval" / "adapted.json").read_text())
    assert len(adapted["adapters"]) == 8 and all((tmp_path / "meta" / p).is_file() for p in adapted["adapters"].values())
    parser = _Collect()
    parser.feed((tmp_path / "report.html").read_text())
    assert set(SECTIONS.values()) <= set(parser.headings)
    assert parser.images >= 4
    run_demo(tmp_path, budget=MICRO_DEMO, overrides=overrides, progress=False)
    again = capsys.readouterr().out
    assert again.count("already done, skipped") == 10
    assert json.loads((tmp_path / "demo.json").read_text())["retrieval"] == summary["retrieval"]
