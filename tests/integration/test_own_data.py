"""A user's own role-play folder (no world.json): it fine-tunes, meta-trains and evaluates with fluency and loss."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from personae.app.cli import main
from personae.config import apply_overrides
from personae.errors import PersonaeError
from personae.eval.adaptation import evaluate_adaptation
from personae.eval.roleplay import evaluate_roleplay, format_roleplay_table
from personae.models.io import load_model
from personae.train.finetune import run_config, run_finetune
from personae.train.meta import run_meta_train

META = ["meta.persona_swap=false", "meta.algo=fomaml", "meta.inner_optimizer=sgd", "meta.inner_lr=0.05",
        "meta.train.steps=2", "meta.train.warmup_steps=1", "meta.meta_batch=2", "meta.support=2", "meta.query=2",
        "meta.inner_steps=1"]


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP spin-waits on the shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def own_data(small_world, tmp_path_factory):
    """The small world's dialogues, cards and images without world.json: a plain role-play folder."""
    folder = tmp_path_factory.mktemp("own") / "data"
    shutil.copytree(small_world, folder, ignore=shutil.ignore_patterns("world.json"))
    return folder


@pytest.fixture(scope="module")
def own_finetuned(pretrained_run, own_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("own-finetuned")
    cfg = apply_overrides(run_config(pretrained_run), ["finetune.train.steps=3", "finetune.persona_swap=0"])
    state = run_finetune(pretrained_run, own_data, out, cfg, progress=False)
    return out, state


def test_own_data_fine_tunes_and_evaluates_with_fluency_only(own_finetuned, own_data, small_world, capsys):
    out, state = own_finetuned
    assert len(state.history) == 3 and all(math.isfinite(row["loss"]) for row in state.history)
    model, _, tokenizer = load_model(out)
    result = evaluate_roleplay(model, tokenizer, own_data, limit=2, progress=False)
    assert result["metrics"] == {} and result["samples"] == [] and result["conversations"] == 4
    assert set(result["fluency_perplexity"]) == {"train", "heldout"}
    assert all(value > 1.0 for value in result["fluency_perplexity"].values())
    # the same model on the scene world: the same fluency, plus the exact metrics
    world = evaluate_roleplay(model, tokenizer, small_world, limit=2, progress=False)
    assert world["fluency_perplexity"] == pytest.approx(result["fluency_perplexity"])
    assert set(world["metrics"]) == {"train", "heldout"} and world["turns"] == result["turns"]
    assert "no exact metrics for this data" in format_roleplay_table(result)
    assert main(["-q", "eval", "roleplay", str(out), "--data", str(own_data), "--limit", "1"]) == 0
    assert "no exact metrics" in capsys.readouterr().out


def test_own_data_meta_trains_and_reports_adaptation_loss(own_finetuned, own_data, tmp_path):
    out, _ = own_finetuned
    state = run_meta_train(out, own_data, tmp_path / "meta", apply_overrides(run_config(out), META), progress=False)
    assert state.step == 2 and state.history and all(math.isfinite(row["loss"]) for row in state.history)
    result = evaluate_adaptation({"meta": tmp_path / "meta"}, own_data, ks=[1], steps=[0, 1], generate_ks=(),
                                 generate_steps=(), query=1, progress=False)
    assert result["metrics"] == {} and result["characters"]
    assert all(math.isfinite(v) for v in result["query_loss"]["meta"]["1"].values())
    with pytest.raises(PersonaeError, match="no exact role-play metrics"):
        evaluate_adaptation({"meta": tmp_path / "meta"}, own_data, ks=[1], steps=[0, 1], generate_ks=[1],
                            generate_steps=[1], query=1, progress=False)
