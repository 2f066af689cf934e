"""Memory switches: gradient checkpointing, bf16 autocast and locked parts give the losses and updates they should."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from personae.data.tokenizer import train_tokenizer
from personae.models.checkpointing import enable_checkpointing
from personae.models.lora import lora_parameters
from personae.models.model import PersonaeModel
from personae.train.distributed import DistInfo
from personae.train.trainer import Trainer, trainable_summary
from tests.conftest import micro_config
from tests.unit.test_hf_decoder import _model as hf_model
from tests.unit.test_hf_lora import hf_folder

pytestmark = pytest.mark.usefixtures("one_thread")


class EveryPartTask(nn.Module):
    """A loss through every tower: next-token loss on an image prefix + the fused cls + the ITC embeddings."""

    def __init__(self, model: PersonaeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        model, ids = self.model, batch["input_ids"]
        logits = model.lm_logits(batch["pixel_values"], ids)[:, -ids.shape[1] : -1]
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        if model.cfg.decoder.kind == "own":
            out = model(batch["pixel_values"], ids % model.cfg.text.vocab_size)
            fused = model.fuse(out.regions, out.words)
            loss = loss + fused.cls.float().pow(2).mean() + (out.image_embed * out.text_embed).float().sum(-1).mean()
        return {"loss": loss}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_folder(tmp_path_factory, "llama")


def own_model(*overrides: str) -> PersonaeModel:
    torch.manual_seed(0)
    return PersonaeModel(micro_config("model.decoder.enabled=true", "model.dropout=0.0", *overrides).model)


def batch_for(model: PersonaeModel, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    size = model.cfg.vision.image_size
    return {"pixel_values": torch.randn(2, 3, size, size, generator=g),
            "input_ids": torch.randint(5, vocab, (2, 9), generator=g)}


def loss_and_grads(model: PersonaeModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = EveryPartTask(model)(batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["own", "hf"])
def test_checkpointing_gives_the_same_loss_and_gradients(kind, llama):
    model = own_model() if kind == "own" else hf_model(llama)
    vocab = model.cfg.text.vocab_size if kind == "own" else model.decoder.lm.config.vocab_size
    batch = batch_for(model, min(vocab, model.cfg.text.vocab_size))
    plain_loss, plain = loss_and_grads(model, batch)
    switched = enable_checkpointing(model)
    assert switched == 4  # a vision, text and fusion block each, and the decoder's block (own) or the HF LM
    assert enable_checkpointing(model) == 0  # idempotent
    if kind == "hf":
        assert model.decoder.lm.is_activation_checkpointing
    ckpt_loss, ckpt = loss_and_grads(model, batch)
    assert torch.allclose(plain_loss, ckpt_loss, atol=1e-6)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


def test_checkpointing_recomputes_in_backward():
    model = own_model()
    enable_checkpointing(model)
    calls = []
    # a pre-hook: the recompute stops early, inside the block, once it has what backward needs
    model.decoder.blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    loss_and_grads(model, batch_for(model, model.cfg.text.vocab_size))
    assert len(calls) == 2  # forward, then again in backward
    with torch.no_grad():
        model.eval().lm_logits(None, torch.tensor([[5, 6, 7]]))
    assert len(calls) == 3  # eval / no grad: a plain forward


def test_a_deep_copy_checkpoints_its_own_blocks():
    model = own_model()
    enable_checkpointing(model)
    twin = copy.deepcopy(model)
    assert twin.decoder.blocks[0].forward.args[0] is twin.decoder.blocks[0]
    assert enable_checkpointing(twin) == 0  # already on in the copy
    with torch.no_grad():
        for p in twin.decoder.parameters():
            p.add_(0.1)
    batch = batch_for(model, model.cfg.text.vocab_size)
    assert not torch.allclose(loss_and_grads(model, batch)[0], loss_and_grads(twin, batch)[0])


def run_trainer(model: PersonaeModel, tmp_path: Path, name: str, *overrides: str, steps: int = 3) -> Trainer:
    config = micro_config(f"train.steps={steps}", "train.warmup_steps=1", "train.lr=1e-3", *overrides)
    tokenizer = train_tokenizer(["an image and its caption"] * 10, vocab_size=300)
    batch = batch_for(model, model.cfg.text.vocab_size)
    trainer = Trainer(EveryPartTask(model), model, None, None, config, tokenizer, tmp_path / name, DistInfo(),
                      progress=False, batch_fn=lambda micro_step: batch, batch_items=2)
    trainer.fit()
    return trainer


def test_bf16_autocast_trains_and_starts_near_the_float32_loss(tmp_path):
    fp32 = run_trainer(own_model(), tmp_path, "fp32").state.history
    bf16 = run_trainer(own_model(), tmp_path, "bf16", "train.bf16=true").state.history
    losses = [row["loss"] for row in bf16]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 0.02 * abs(fp32[0]["loss"]) + 0.02
    model = own_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = EveryPartTask(model)(batch_for(model, model.cfg.text.vocab_size))["loss"]
    assert loss.dtype == torch.float32  # the loss itself is float32 under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_checkpointing_through_the_trainer_gives_the_same_run(tmp_path):
    plain = run_trainer(own_model(), tmp_path, "plain").state.history
    ckpt = run_trainer(own_model(), tmp_path, "ckpt", "train.gradient_checkpointing=true").state.history
    assert [row["loss"] for row in plain] == pytest.approx([row["loss"] for row in ckpt], abs=1e-5)


def test_meta_training_refuses_checkpointing(tmp_path):
    config = micro_config("meta.train.gradient_checkpointing=true")
    model = own_model()
    with pytest.raises(ValueError, match="meta.train.gradient_checkpointing"):
        Trainer(EveryPartTask(model), model, None, None, config, train_tokenizer(["a b"] * 10, vocab_size=300),
                tmp_path, DistInfo(), stage="meta", train_cfg=config.meta.train, batch_fn=lambda step: {})


def frozen_copy(model: PersonaeModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_locked_parts_stay_bit_identical_and_the_rest_trains(tmp_path, capsys):
    model = own_model("model.vision.locked=true", "model.text.locked=true", "model.decoder.locked=true",
                      "model.lora_rank=2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    decoder_trainable = {n.removeprefix("decoder.") for n in trainable if n.startswith("decoder.")}
    assert all(n.startswith("image_proj.") or n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in decoder_trainable)
    assert set(lora_parameters(model)) <= trainable and any(n.startswith("decoder.image_proj.") for n in trainable)
    assert not any(n.startswith(("vision.", "text.")) for n in trainable)
    before = frozen_copy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = micro_config("train.steps=3", "train.warmup_steps=1")
    tokenizer = train_tokenizer(["an image and its caption"] * 10, vocab_size=300)
    batch = batch_for(model, model.cfg.text.vocab_size)
    Trainer(EveryPartTask(model), model, None, None, config, tokenizer, tmp_path / "run", DistInfo(),
            progress=True, batch_fn=lambda micro_step: batch, batch_items=2).fit()
    after = dict(model.named_parameters())
    assert before and all(torch.equal(before[n], after[n]) for n in before)
    moved = [n for n in start if not torch.equal(start[n], after[n])]
    assert any("lora_B" in n for n in moved) and any(n.startswith("decoder.image_proj.") for n in moved)
    assert trainable_summary(model) in capsys.readouterr().out


def test_a_locked_hf_decoder_trains_only_its_projector_and_lora(llama):
    cfg = hf_model(llama).cfg
    cfg = dataclasses.replace(cfg, lora_rank=2, decoder=dataclasses.replace(cfg.decoder, locked=True))
    torch.manual_seed(1)
    model = PersonaeModel(cfg)
    lm_trainable = [n for n, p in model.decoder.lm.named_parameters() if p.requires_grad]
    assert lm_trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in lm_trainable)
    assert all(p.requires_grad for p in model.decoder.image_proj.parameters())
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable_summary(model) == f"trainable parameters: {count:,} of {total:,} ({100 * count / total:.2f} %)"


def test_a_later_stage_locks_the_parts_its_config_names():
    model = own_model("model.lora_rank=2")  # built unlocked, as a loaded run with a decoder is
    later = micro_config("model.decoder.enabled=true", "model.vision.locked=true", "model.decoder.locked=true").model
    model.lock_parts(later)
    assert not any(p.requires_grad for p in model.vision.parameters()) and model.cfg.vision.locked
    assert model.train().vision.training is False  # kept in eval mode by train()
    trainable = [n for n, p in model.decoder.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("image_proj.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.requires_grad for p in model.text.parameters())  # not named: left as it is
