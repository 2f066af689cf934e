"""Shared fixtures: a small scene world built once per test session, and a micro model config."""

from __future__ import annotations

from pathlib import Path

import pytest

from personae.config import Config, apply_overrides, load_preset

MICRO = [
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=64", "model.vision.depth=1",
    "model.vision.heads=2", "model.text.width=64", "model.text.depth=1", "model.text.heads=2",
    "model.text.max_len=40", "model.fusion.depth=1", "model.fusion.heads=2", "model.embed_dim=32",
    "train.batch_size=16", "train.warmup_steps=3", "train.log_every=1", "train.lr=2e-3",
    "pretrain.tokenizer_vocab=1500", "model.decoder.width=64", "model.decoder.depth=1", "model.decoder.heads=2",
    "model.decoder.max_len=640", "model.decoder.image_pool=1", "finetune.train.batch_size=8",
    "finetune.train.warmup_steps=3", "finetune.train.log_every=1", "finetune.train.lr=3e-3",
]


def micro_config(*overrides: str) -> Config:
    """The tiny preset shrunk further so that a training step takes milliseconds."""
    return apply_overrides(load_preset("tiny"), MICRO + list(overrides))


@pytest.fixture()
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on shared cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def pretrained_run(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro model pretrained for a few steps on the small world (enough to fine-tune from)."""
    from personae.train.pretrain import run_pretrain

    run = tmp_path_factory.mktemp("pretrained")
    run_pretrain(small_world, run, micro_config("train.steps=3"), progress=False)
    return run


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-scene world at 32 px, built once."""
    from personae.world import build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, scenes=300, image_size=32, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_lm():
    """(the tiny preset's model with a decoder, random weights; a 300-token BPE) for decoding tests."""
    import torch

    from personae.data.tokenizer import train_tokenizer
    from personae.models.model import PersonaeModel

    tokenizer = train_tokenizer(["ahoy there matey, I spy two dogs on the beach. fair winds!"] * 30, vocab_size=300)
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.max_len = tokenizer.vocab_size, True, 160
    torch.manual_seed(0)
    return PersonaeModel(cfg).eval(), tokenizer
