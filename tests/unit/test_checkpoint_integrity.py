"""Checkpoints under damage (issue 16): checksums, fallback on resume, staging, full or read-only disks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from personae.data.tokenizer import Tokenizer, train_tokenizer
from personae.models.io import MANIFEST_FILE, MODEL_FILE, CheckpointError, load_model, verify_checkpoint
from personae.models.model import PersonaeModel
from personae.train import checkpoint as checkpoint_module
from personae.train.checkpoint import latest_checkpoint, save_checkpoint
from personae.train.distributed import DistInfo
from personae.train.trainer import Trainer
from tests.conftest import micro_config


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(["a dog on the beach", "two cats in the city"] * 10, vocab_size=280)


@pytest.fixture()
def saved(tmp_path: Path, tokenizer: Tokenizer) -> Path:
    """A real model checkpoint (micro config) in tmp_path/ckpt."""
    cfg = micro_config()
    cfg.model.text.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", PersonaeModel(cfg.model), cfg, tokenizer)


def test_the_manifest_records_every_file_and_a_good_checkpoint_verifies(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert manifest["files"][MODEL_FILE]["bytes"] == (saved / MODEL_FILE).stat().st_size
    assert verify_checkpoint(saved) is True
    load_model(saved)


def test_a_truncated_weights_file_is_an_error_naming_the_file(saved: Path) -> None:
    weights = saved / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{weights}: damaged, \d+ bytes where checkpoint.json records"):
        load_model(saved)
    (saved / MANIFEST_FILE).unlink()  # an old run without checksums: the reader still names the file
    with pytest.raises(CheckpointError, match=rf"{weights}: damaged or not a safetensors file"):
        load_model(saved)


def test_flipped_bits_in_the_weights_are_detected_not_loaded(saved: Path) -> None:
    weights = saved / MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor: safetensors alone would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{weights}: damaged, its sha256 does not match"):
        load_model(saved)
    (saved / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        verify_checkpoint(saved)


def test_runs_written_before_checksums_still_load_with_a_note(saved: Path, caplog: pytest.LogCaptureFixture) -> None:
    (saved / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.INFO):
        assert verify_checkpoint(saved) is False
        load_model(saved)
    assert "written before checksums" in caplog.text


# ------------------------------------------------------------------------------------ the trainer


class CountingTask(nn.Module):
    """A least-squares task on a linear model; counts its calls (a no-op resume makes none)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, Any]:
        self.calls += 1
        return {"loss": ((self.model(batch["x"]) - batch["y"]) ** 2).mean()}


def _batch(micro_step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(micro_step)
    x = torch.randn(4, 3, generator=g)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def _trainer(run: Path, tokenizer: Tokenizer, steps: int = 6) -> tuple[Trainer, CountingTask]:
    cfg = micro_config(f"train.steps={steps}", "train.save_every=2", "train.warmup_steps=1")
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    task = CountingTask(model)
    trainer = Trainer(task, model, None, None, cfg, tokenizer, run, DistInfo(), stage="pretrain", progress=False,
                      batch_fn=_batch, batch_items=4)
    return trainer, task


def _losses(state: Any) -> list[float]:
    return [row["loss"] for row in state.history]


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path, tokenizer: Tokenizer,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    full = _trainer(tmp_path / "full", tokenizer)[0].fit()
    _trainer(tmp_path / "cut", tokenizer)[0].fit(stop_at=5)  # step_0000004 and step_0000005
    step5 = tmp_path / "cut" / "checkpoints" / "step_0000005"
    weights = step5 / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-4])
    (tmp_path / "cut" / "checkpoints" / "step_9999999").mkdir()  # an empty newer folder
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path / "cut") == tmp_path / "cut" / "checkpoints" / "step_0000004"
        trainer, task = _trainer(tmp_path / "cut", tokenizer)
        resumed = trainer.fit(resume=True)
    assert "step_9999999: the folder is empty" in caplog.text and f"{weights}: damaged" in caplog.text
    assert "resuming from" in caplog.text and "step_0000004, the newest intact checkpoint" in caplog.text
    assert task.calls == 2 and _losses(resumed) == pytest.approx(_losses(full), rel=1e-6)


def test_when_every_checkpoint_is_damaged_resume_says_why(tmp_path: Path, tokenizer: Tokenizer) -> None:
    _trainer(tmp_path / "run", tokenizer)[0].fit(stop_at=2)
    (tmp_path / "run" / "checkpoints" / "step_0000002" / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from: .*trainer_state.json: damaged"):
        _trainer(tmp_path / "run", tokenizer)[0].fit(resume=True)


def test_resume_of_a_finished_run_is_a_no_op_that_says_so(tmp_path: Path, tokenizer: Tokenizer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    first = _trainer(tmp_path / "run", tokenizer)[0].fit()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    weights = (tmp_path / "run" / MODEL_FILE).read_bytes()
    (tmp_path / ".run.a1b2c3d4.tmp").mkdir()  # a final save that was killed: cleared even here
    trainer, task = _trainer(tmp_path / "run", tokenizer)
    with caplog.at_level(logging.WARNING):
        again = trainer.fit(resume=True)
    assert not (tmp_path / ".run.a1b2c3d4.tmp").exists()
    assert task.calls == 0 and again.step == 6 and _losses(again) == _losses(first)
    assert "already finished (step 6 of 6); nothing to do" in caplog.text
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "run" / MODEL_FILE).read_bytes() == weights
    longer, task = _trainer(tmp_path / "run", tokenizer, steps=8)  # more steps asked: it trains on,
    assert longer.fit(resume=True).step == 8 and task.calls == 4  # from the last step checkpoint (4)


def test_staging_left_by_interrupted_saves_is_removed_at_the_next_start(tmp_path: Path, tokenizer: Tokenizer) -> None:
    run = tmp_path / "run"
    _trainer(run, tokenizer)[0].fit(stop_at=2)
    leftovers = [run / "checkpoints" / ".step_0000004.k2j4h5g6.tmp", tmp_path / ".run.a1b2c3d4.tmp"]
    for folder in leftovers:
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(b"\0" * 1000)
    (run / ".metrics.jsonl.zz99yy88.tmp").write_text("half")
    strangers = [tmp_path / ".run2.a1b2c3d4.tmp", tmp_path / "run.a1b2c3d4.tmp", run / "checkpoints" / "notes.tmp"]
    for path in strangers:
        path.write_text("not ours")
    _trainer(run, tokenizer)[0].fit(resume=True)
    assert not any(p.exists() for p in leftovers) and not (run / ".metrics.jsonl.zz99yy88.tmp").exists()
    assert all(p.read_text() == "not ours" for p in strangers)


def test_an_unwritable_or_full_output_folder_fails_before_the_first_step(tmp_path: Path, tokenizer: Tokenizer,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoints folder should be")
    trainer, task = _trainer(blocked, tokenizer)
    with pytest.raises(CheckpointError, match=r"checkpoints: checkpoints cannot be written there"):
        trainer.fit()
    assert task.calls == 0
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    trainer, task = _trainer(tmp_path / "full", tokenizer)
    with pytest.raises(CheckpointError, match=r"0 MiB free, but a checkpoint needs about 16 MiB"):
        trainer.fit()
    assert task.calls == 0


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path: Path, tokenizer: Tokenizer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    trainer, _ = _trainer(run, tokenizer)
    trainer.fit(stop_at=2)
    calls = []

    def disk_full(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        calls.append(filename)
        save_file(tensors, filename, metadata)
        if filename.endswith("optimizer.safetensors"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", disk_full)
    trainer, _ = _trainer(run, tokenizer)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit(resume=True)  # the save at step 4 fails
    assert calls and [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    assert verify_checkpoint(run / "checkpoints" / "step_0000002", ("trainer_state.json",))
