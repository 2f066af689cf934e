"""The contrastive temperature's bound: on the parameter after each optimiser step, not in the forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from personae.data.tokenizer import train_tokenizer
from personae.models.model import MAX_LOGIT_SCALE, PersonaeModel
from personae.objectives import ContrastiveLoss
from personae.train.distributed import DistInfo
from personae.train.trainer import Trainer
from tests.conftest import micro_config


class ContrastiveTask(nn.Module):
    """ITC alone on a fixed batch: the loss whose gradient reaches logit_scale."""

    def __init__(self, model: PersonaeModel) -> None:
        super().__init__()
        self.model, self.itc = model, ContrastiveLoss()

    def forward(self, batch: dict[str, torch.Tensor],
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        out = self.model(batch["pixel_values"], batch["input_ids"])
        metrics = self.itc(out.image_embed, out.text_embed, out.logit_scale)
        return metrics | {"loss": metrics["loss_itc"]}


def _model_and_batch() -> tuple[PersonaeModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = PersonaeModel(micro_config().model)
    size, vocab = model.cfg.vision.image_size, model.cfg.text.vocab_size
    batch = {"pixel_values": torch.randn(4, 3, size, size), "input_ids": torch.randint(5, vocab, (4, 7))}
    return model, batch


def test_the_gradient_reaches_logit_scale_above_the_bound(one_thread) -> None:
    model, batch = _model_and_batch()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    out = ContrastiveTask(model)(batch)
    assert out["temperature"].item() == pytest.approx(1 / 150.0, rel=1e-5)  # no clamp in the forward
    out["loss_itc"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 1e-6


def test_a_trainer_step_puts_logit_scale_back_at_the_bound(one_thread, tmp_path: Path) -> None:
    model, batch = _model_and_batch()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(150.0))
    config = micro_config("train.steps=1", "train.warmup_steps=1")
    tokenizer = train_tokenizer(["an image and its caption"] * 10, vocab_size=300)
    trainer = Trainer(ContrastiveTask(model), model, None, None, config, tokenizer, tmp_path / "run", DistInfo(),
                      progress=False, batch_fn=lambda micro_step: batch, batch_items=4)
    trainer.fit()
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE, abs=1e-6)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)


def test_below_the_bound_the_step_is_left_alone(one_thread) -> None:
    model, _ = _model_and_batch()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))
    assert PersonaeModel(micro_config("model.init_temperature=0.001").model).scale().item() == pytest.approx(100.0)
