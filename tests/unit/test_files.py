"""The one atomic writer: a failed write leaves the target as it was and no temporary behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from personae.files import atomic_directory, atomic_path, write_bytes_atomic, write_text_atomic


class Interrupted(RuntimeError):
    """Stands for a crash (disk full, Ctrl-C) in the middle of a write."""


def test_text_and_bytes_replace_the_target_with_ordinary_permissions(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "folder" / "card.json"
    assert write_text_atomic(target, "first\nline\n") == target
    assert target.read_bytes() == b"first\nline\n"
    write_bytes_atomic(target, b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["card.json"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "records.jsonl"
    target.write_text('{"old": 1}\n')
    with pytest.raises(Interrupted), atomic_path(target) as staging:
        with staging.open("w") as handle:
            handle.write('{"new": 1}\n{"new": ')  # half a record when the crash comes
        raise Interrupted
    assert target.read_text() == '{"old": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]


def test_a_failed_first_write_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(Interrupted), atomic_path(tmp_path / "adapter.safetensors") as staging:
        save_file({"w": torch.ones(2)}, str(staging))
        raise Interrupted
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_works_with_writers_that_take_a_file_name(tmp_path: Path) -> None:
    target = tmp_path / "aux.safetensors"
    with atomic_path(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".aux.safetensors.")
        save_file({"w": torch.arange(3.0)}, str(staging))
    assert torch.equal(load_file(str(target))["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["aux.safetensors"]


def test_a_new_directory_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "step_0000010"
    with pytest.raises(Interrupted), atomic_directory(target) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        raise Interrupted
    assert list((tmp_path / "checkpoints").iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in target.parent.iterdir()] == ["step_0000010"]


def test_into_an_existing_directory_files_move_first_to_last(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("kept\n")
    (run / "model.safetensors").write_bytes(b"old")
    moved: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved.append(Path(dst).name), real_replace(src, dst)))
    with atomic_directory(run, first=("model.safetensors",), last=("trainer_state.json",)) as staging:
        for name in ("trainer_state.json", "config.json", "model.safetensors", "tokenizer.json"):
            (staging / name).write_text(name)
    assert moved[0] == "model.safetensors" and moved[-1] == "trainer_state.json"
    assert sorted(moved[1:-1]) == ["config.json", "tokenizer.json"]
    assert (run / "model.safetensors").read_text() == "model.safetensors"
    assert (run / "metrics.jsonl").read_text() == "kept\n"  # files the checkpoint does not write stay
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_failed_update_of_an_existing_directory_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"old")
    with pytest.raises(Interrupted), atomic_directory(run) as staging:
        (staging / "model.safetensors").write_bytes(b"new")
        raise Interrupted
    assert (run / "model.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
