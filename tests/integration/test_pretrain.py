"""Pretraining end to end on a small world: loss falls, resume is exact, checkpoints reload exactly."""

import json

import pytest
import torch

from personae.app.cli import main
from personae.models import PersonaeModel
from personae.models.io import load_model
from personae.train.checkpoint import save_checkpoint
from personae.train.pretrain import run_pretrain
from tests.conftest import MICRO, micro_config


def _losses(history):
    return [row["loss"] for row in history]


def test_thirty_steps_lower_the_loss(small_world, tmp_path):
    state = run_pretrain(small_world, tmp_path / "run", micro_config("train.steps=30"), progress=False)
    losses = _losses(state.history)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5, losses
    for key in ("loss_itc", "loss_itm", "loss_mlm", "itm_acc", "mlm_acc", "temperature", "lr", "grad_norm"):
        assert key in state.history[-1]
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in logged] == losses
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"):
        assert (tmp_path / "run" / name).exists()


def test_resumed_run_repeats_the_uninterrupted_losses(small_world, tmp_path):
    cfg = ["train.steps=8", "train.save_every=4", "model.dropout=0.1", "train.grad_accum=2"]
    full = run_pretrain(small_world, tmp_path / "full", micro_config(*cfg), progress=False)
    run_pretrain(small_world, tmp_path / "cut", micro_config(*cfg), progress=False, stop_at=5)
    assert (tmp_path / "cut" / "checkpoints" / "step_0000005").exists()
    resumed = run_pretrain(small_world, tmp_path / "cut", micro_config(*cfg), progress=False, resume=True)
    assert _losses(resumed.history) == pytest.approx(_losses(full.history), rel=1e-6, abs=1e-7)
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))


def test_checkpoint_reloads_to_identical_outputs(small_world, tmp_path):
    from personae.data.tokenizer import train_tokenizer

    cfg = micro_config("model.fusion.kind=single")
    tokenizer = train_tokenizer(["a dog on the beach", "two cats in the city"] * 20, vocab_size=300)
    cfg.model.text.vocab_size = tokenizer.vocab_size
    model = PersonaeModel(cfg.model).eval()
    save_checkpoint(tmp_path / "ckpt", model, cfg, tokenizer)
    loaded, loaded_cfg, loaded_tok = load_model(tmp_path / "ckpt")
    loaded.eval()
    assert loaded_cfg == cfg and loaded_tok.encode("a dog", max_length=8) == tokenizer.encode("a dog", max_length=8)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(0, tokenizer.vocab_size, (2, 7))
    a, b = model(pixels, ids), loaded(pixels, ids)
    assert torch.equal(a.image_embed, b.image_embed) and torch.equal(a.text_embed, b.text_embed)
    assert torch.equal(model.mlm_logits(model.fuse(a.regions, a.words).words),
                       loaded.mlm_logits(loaded.fuse(b.regions, b.words).words))


def test_cli_pretrain_and_eval(small_world, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["-q", "pretrain", "--data", str(small_world), "--out", str(run), "--train.steps=4"]
                + [f"--{o}" for o in MICRO]) == 0
    assert main(["-q", "eval", "retrieval", str(run), "--data", str(small_world)]) == 0
    result = json.loads((run / "eval" / "retrieval.json").read_text())
    for key in ("i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10", "itm_acc", "mlm_acc"):
        assert 0.0 <= result[key] <= 1.0
    assert result["i2t_r@1"] <= result["i2t_r@5"] <= result["i2t_r@10"]
    assert "image->text" in capsys.readouterr().out


def test_cli_rejects_unknown_config_key(small_world, tmp_path, capsys):
    code = main(["-q", "pretrain", "--data", str(small_world), "--out", str(tmp_path / "r"), "--train.lrr=1"])
    assert code == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, small_world, capsys):
    assert main(["-q", "eval", "retrieval", str(tmp_path), "--data", str(small_world)]) == 2
    assert "not a personae checkpoint, config.json is missing" in capsys.readouterr().err
