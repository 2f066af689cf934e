"""Tests for the HTML report: a synthetic run folder gives a self-contained, escaped page with every section."""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from personae.eval.report import SECTIONS, find_curves, read_jsonl, report_command, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> & more"


class PageParser(HTMLParser):
    """Collects headings, image sources, every attribute value and the tags seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.attributes: list[str] = []
        self.headings: dict[str, list[str]] = {"h2": [], "h3": []}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += [value or "" for _, value in attrs]
        if tag == "img":
            self.images.append(dict(attrs))
        self._open = tag if tag in self.headings else None

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open:
            self.headings[self._open].append(data)


def parse(path: Path) -> tuple[str, PageParser]:
    text = path.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return text, parser


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def scores(value: float | None) -> dict[str, float | None]:
    return {"response_accuracy": value, "image_text_relevance": 0.5, "relevance_precision": 1.0,
            "relevance_recall": 0.25, "instruction_adherence": 1.0, "persona_consistency": 0.0,
            "knowledge_consistency": None}


def roleplay_result() -> dict[str, Any]:
    block = {"overall": {"n": 2, **scores(0.5)}, "by_type": {"count": {"n": 1, **scores(1.0)},
                                                             "describe": {"n": 1, **scores(None)}}}
    samples = [{"dialogue": "s1-c0", "turn": 0, "type": "count", "character": "captain-saltbeard",
                "character_split": "train", "user": "How many dogs?", "reference": "Arr, two dogs!",
                "reply": EVIL, **scores(1.0)},
               {"dialogue": "s2-c1", "turn": 0, "type": "describe", "character": "gizmotron",
                "character_split": "heldout", "user": "Describe it.", "reference": "A CAT.",
                "reply": "a dog", **scores(0.0)}]
    return {"split": "test", "conversations": 2, "turns": 2, "metrics": {"train": block, "heldout": block},
            "fluency_perplexity": {"train": 3.2, "heldout": 4.1}, "samples": samples}


def grounding_result() -> dict[str, Any]:
    """eval/grounding.json's shape (personae.eval.grounding) with known numbers."""
    row = {"n": 40, "true": 4.51, "shuffled": 4.75, "blank": 4.875}
    return {"split": "test", "conversations": 2, "prefix_positions": 17, "kinds": ["object names", "other"],
            "loss": {"all": row, "by_kind": {"object names": row, "other": {"n": 0, "true": None, "shuffled": None,
                                                                              "blank": None}},
                     "by_type": {"count": row}},
            "attention": {"all tokens": {"n": 40, "uniform": 0.09, "mass": [[0.125, 0.375]]},
                          "object names": {"n": 40, "uniform": 0.09, "mass": [[0.125, 0.375]]}}}


def make_run(root: Path, *, meta: bool = True) -> Path:
    """A demo-shaped run folder: world with two images, pretrain, role-play and (optionally) meta stages."""
    world = root / "world"
    (world / "images").mkdir(parents=True)
    for name, colour in (("s1", (200, 40, 40)), ("s2", (40, 40, 200))):
        Image.new("RGB", (16, 16), colour).save(world / "images" / f"{name}.png")
    write_jsonl(world / "dialogues.jsonl", [{"id": "s1-c0", "image": "images/s1.png"},
                                           {"id": "s2-c1", "image": "images/s2.png"}])
    write_json(world / "world.json", {"scenes": 2, "image_size": 16, "splits": {"test": 2}})
    rows = [{"step": s, "stage": "pretrain", "loss": 3.0 / s, "loss_itc": 1.0 / s, "itc_acc": s / 10, "lr": 1e-3}
            for s in range(1, 6)]
    write_jsonl(root / "pretrain" / "metrics.jsonl", rows)
    write_json(root / "pretrain" / "config.json", {"model": {"hidden": 32}, "note": "</pre><b>x</b>"})
    write_json(root / "pretrain" / "eval" / "retrieval.json",
               {"pairs": 100, "unique_captions": 90, "i2t_r@1": 0.2, "i2t_r@5": 0.5, "i2t_r@10": 0.7,
                "t2i_r@1": 0.25, "t2i_r@5": 0.55, "t2i_r@10": 0.75, "chance_r@1": 0.01, "chance_r@5": 0.05,
                "chance_r@10": 0.1, "itm_acc": 0.8, "mlm_acc": 0.3})
    write_jsonl(root / "roleplay" / "metrics.jsonl", [{"step": s, "loss": 2.0 / s, "lm_acc": 0.1 * s}
                                                      for s in range(1, 4)])
    write_json(root / "roleplay" / "eval" / "roleplay.json", roleplay_result())
    write_json(root / "roleplay" / "eval" / "grounding.json", grounding_result())
    if meta:
        write_json(root / "meta" / "eval" / "adaptation.json",
                   {"steps": [0, 1, 5], "curves": {"maml": {"k=5": {"query_loss": [2.0, 1.5, 1.0],
                                                                     "persona_consistency": [0.1, 0.5, 0.9]}},
                                                   "multitask": {"k=5": {"query_loss": [2.0, 1.8, 1.6]}}}})
        write_json(root / "ablation.json", {
            "budget": {"name": "micro"}, "seeds": [0, 1, 2],
            "columns": {"retrieval_r1": "retrieval R@1", "persona_seen": "persona (seen)"},
            "table": [{"variant": "full", "group": "pretraining", "description": "the <default>",
                       "retrieval_r1": {"mean": 0.25, "std": 0.02, "n": 3}, "persona_seen": None}]})
    write_json(root / "demo.json", {"seconds": {"pretrain (ITC + ITM + MLM)": 12.5, "total": 20.0}})
    return root


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, PageParser]:
    run = make_run(tmp_path_factory.mktemp("run"))
    return parse(write_report(run))


def test_report_has_every_section_and_a_plot_per_figure(full_report: tuple[str, PageParser]) -> None:
    text, page = full_report
    assert all(title in page.headings["h2"] for title in SECTIONS.values())
    plots = [img for img in page.images if "plot" in (img.get("class") or "")]
    # training curves for 2 stages, retrieval bars, role-play bars, adaptation curves
    assert len(plots) == 5
    scenes = [img for img in page.images if img not in plots]
    assert len(scenes) == 2  # one per gallery dialogue, both found through world/dialogues.jsonl
    for img in page.images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "not run" not in text
    assert "0.250 <span class='muted'>± 0.020</span>" in text and "the &lt;default&gt;" in text


def test_report_is_self_contained_and_escaped(full_report: tuple[str, PageParser]) -> None:
    text, page = full_report
    assert "http" not in text  # no external URL anywhere: no scripts, fonts, styles or images fetched
    assert "script" not in page.tags and "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert "&lt;/pre&gt;&lt;b&gt;x&lt;/b&gt;" in text  # config values are escaped too
    assert "Arr, two dogs!" in text  # the reference reply is shown next to the model's
    assert text.count("b-good") >= 3 and text.count("b-bad") >= 2 and "b-na" in text


def test_report_tables_hold_the_numbers(full_report: tuple[str, PageParser]) -> None:
    text, _ = full_report
    assert "0.200" in text and "0.750" in text  # i2t R@1, t2i R@10
    assert "4.100" in text  # held-out fluency perplexity
    assert "maml, k=5" in text and "multitask, k=5" in text
    assert "12.5</td>" in text  # wall time of a stage from demo.json
    assert "<td>4.510</td><td>4.750</td><td>4.875</td><td>0.240</td><td>0.365</td>" in text  # grounding losses, gaps
    assert "<td>0.250</td><td>0.375</td><td>0.090</td>" in text  # mean and top head on the prefix, uniform


def test_partial_run_says_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", meta=False)
    shutil.rmtree(run / "roleplay")
    out = report_command(run, tmp_path / "elsewhere" / "r.html")
    assert str(out.resolve()) in capsys.readouterr().out
    text, page = parse(out)
    assert all(title in page.headings["h2"] for title in SECTIONS.values())
    assert text.count('<p class="missing">not run') == 5  # role-play, grounding, adaptation, ablation, gallery
    assert len(page.images) == 2  # pretrain curves and retrieval bars


def test_find_curves_reads_nested_and_listed_layouts() -> None:
    nested = {"steps": [0, 1, 2], "curves": {"maml": {"k=1": {"loss": [3, 2, 1], "note": "x"}}}}
    listed = {"results": [{"method": "reptile", "k": 5, "steps": [0, 10], "persona": [0.1, None]}]}
    curves = find_curves(nested) + find_curves(listed)
    assert [(c.label, c.metric, c.values) for c in curves] == [("maml, k=1", "loss", [3, 2, 1]),
                                                             ("reptile k=5", "persona", [0.1, None])]
    assert find_curves({"steps": [0, 1], "loss": [1.0]}) == []  # length mismatch is not a curve


def test_bad_metrics_row_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_jsonl(path)


def test_missing_run_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        write_report(tmp_path / "nope")
