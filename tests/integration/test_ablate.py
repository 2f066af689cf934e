"""The ablation runner with a micro budget: every variant trains and is scored, the table has every row."""

import json

import pytest

from personae.app.ablate import (
    COLUMNS,
    VARIANT_NAMES,
    format_cell,
    markdown_table,
    run_ablation,
    select_variants,
    summarise,
)
from personae.app.budgets import AblationBudget
from personae.errors import PersonaeError
from personae.eval.report import write_report
from tests.conftest import MICRO

MICRO_BUDGET = AblationBudget("micro", scenes=300, pretrain_steps=2, pretrain_batch=16, finetune_steps=2,
                              finetune_batch=8, meta_steps=1, meta_batch=2, support=2, query=2, inner_steps=1,
                              roleplay_limit=2, adapt_query=1, seeds=2, adapt_k=2, adapt_steps=2, adapt_characters=2)


def test_micro_ablation_has_every_row_with_mean_and_spread(small_world, tmp_path, one_thread, capsys):
    table = run_ablation(tmp_path, budget=MICRO_BUDGET, data=small_world, overrides=MICRO, progress=False)
    assert [entry["variant"] for entry in table] == list(VARIANT_NAMES)
    for entry in table:
        assert entry["seeds"] == [0, 1]
        for key in ("response_accuracy", "persona_seen", "persona_heldout_adapted", "train_seconds"):
            assert entry[key]["n"] == 2 and entry[key]["std"] >= 0, (entry["variant"], key)
        pretrained = entry["group"] == "pretraining" and entry["variant"] != "no-pretraining"
        assert (entry["retrieval_r1"] is not None) == pretrained
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert len(saved["rows"]) == 2 * len(VARIANT_NAMES) and saved["table"] == json.loads(json.dumps(table))
    assert {row["adapted_with"] for row in saved["rows"] if row["variant"] in ("maml", "fomaml", "reptile")} == {"all"}
    assert {row["adapted_with"] for row in saved["rows"] if row["variant"] == "lora-maml"} == {"lora"}
    markdown = (tmp_path / "ablation.md").read_text()
    assert all(f"| {name} |" in markdown for name in VARIANT_NAMES)
    html = write_report(tmp_path).read_text()
    assert "no-pretraining" in html and "persona (held-out, adapted)" in html
    capsys.readouterr()
    run_ablation(tmp_path, budget=MICRO_BUDGET, data=small_world, overrides=MICRO, progress=False)  # rows are reused
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"] == saved["rows"]


def test_summary_statistics_and_cells():
    rows = [{"variant": "full", "seed": s, **{k: None for k in COLUMNS}} for s in range(3)]
    for row, value in zip(rows, (0.2, 0.4, 0.6)):
        row["persona_seen"] = value
    rows[1]["response_accuracy"] = 0.5
    entry = summarise(rows, select_variants(["full"]))[0]
    assert entry["persona_seen"]["mean"] == pytest.approx(0.4) and entry["persona_seen"]["std"] == pytest.approx(0.2)
    assert entry["response_accuracy"] == {"mean": 0.5, "std": 0.0, "n": 1} and entry["retrieval_r1"] is None
    assert format_cell(entry["persona_seen"], 3) == "0.400 ± 0.200" and format_cell(None, 3) == "-"
    assert "| pretraining | full | - | 0.500 ± 0.000 |" in markdown_table([entry])


def test_variant_selection():
    assert [v.name for v in select_variants(["maml"])] == ["full", "maml"]  # adaptation rows need the full run
    with pytest.raises(PersonaeError, match="unknown ablation variant.*no-such.*choose from"):
        select_variants(["no-such"])
