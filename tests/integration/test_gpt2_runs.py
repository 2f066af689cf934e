"""A GPT-2 decoder (lm_head tied to wte) through the CLI: the run saves, resumes and loads with the tie intact."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from personae.app.cli import main
from personae.config import apply_overrides
from personae.models.io import ALIASES_KEY, MODEL_FILE, load_model, load_tensors
from personae.train.checkpoint import read_state
from personae.train.finetune import run_config, run_finetune
from tests.hf_folders import gpt2_folder

WTE, HEAD = "decoder.lm.transformer.wte.weight", "decoder.lm.lm_head.weight"


@pytest.fixture(scope="module")
def gpt2(small_world, tmp_path_factory):
    text = (small_world / "dialogues.jsonl").read_text() + "".join(
        path.read_text() for path in sorted((small_world / "characters").glob("*.json")))
    return gpt2_folder(tmp_path_factory.mktemp("lm") / "gpt2", sorted(set(re.findall(r"\w+|[^\w\s]", text))))


def overrides(gpt2) -> list[str]:
    return ["--model.decoder.kind=hf", f"--model.decoder.path={gpt2}", "--model.decoder.max_len=1024",
            "--finetune.train.steps=3", "--finetune.train.batch_size=2", "--finetune.train.save_every=2"]


def finetune(pretrained_run, small_world, gpt2, out, *extra: str) -> None:
    assert main(["-q", "finetune", str(pretrained_run), "--data", str(small_world), "--out", str(out),
                 *overrides(gpt2), *extra]) == 0


def tied(model) -> bool:
    lm = model.decoder.lm
    return lm.lm_head.weight is lm.transformer.wte.weight


def test_a_gpt2_run_saves_its_tied_head_once_and_loads_it_tied(pretrained_run, small_world, gpt2, tmp_path):
    finetune(pretrained_run, small_world, gpt2, tmp_path / "run")
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_0000002"):
        with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
            assert WTE in f.keys() and HEAD not in f.keys()
            assert json.loads(f.metadata()[ALIASES_KEY]) == {HEAD: WTE}
    model, _, _ = load_model(tmp_path / "run")
    assert tied(model)
    trained = load_tensors(tmp_path / "run" / MODEL_FILE)[WTE]
    torch.testing.assert_close(model.decoder.lm.lm_head.weight, trained, rtol=0, atol=0)
    with safe_open(str(gpt2 / "model.safetensors"), framework="pt") as f:
        start = f.get_tensor("transformer.wte.weight")
    assert not torch.equal(trained, start)  # the tied matrix trained, and the file holds the trained one


def test_an_interrupted_gpt2_run_resumes_with_the_tie_and_the_uninterrupted_losses(pretrained_run, small_world,
                                                                                     gpt2, tmp_path):
    finetune(pretrained_run, small_world, gpt2, tmp_path / "full")
    cfg = apply_overrides(run_config(pretrained_run), overrides(gpt2))
    run_finetune(pretrained_run, small_world, tmp_path / "cut", cfg, progress=False, stop_at=2)
    assert (tmp_path / "cut" / "checkpoints" / "step_0000002").is_dir()
    finetune(pretrained_run, small_world, gpt2, tmp_path / "cut", "--resume")
    full, resumed = read_state(tmp_path / "full"), read_state(tmp_path / "cut")
    assert resumed.step == 3
    assert [row["loss"] for row in resumed.history] == pytest.approx([row["loss"] for row in full.history],
                                                                     rel=1e-6, abs=1e-7)
    model, _, _ = load_model(tmp_path / "cut")
    assert tied(model)
    torch.testing.assert_close(model.decoder.lm.lm_head.weight, load_tensors(tmp_path / "full" / MODEL_FILE)[HEAD],
                               rtol=1e-5, atol=1e-6)
