"""Adapters carry a checksum, and files stored by older versions (bad uploads, damaged adapters) never stop serving."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from personae.models.adapter_files import load_verified_adapter, manifest_path, save_verified_adapter, verify_adapter
from personae.models.lora import AdapterError
from personae.serve.app import create_app, load_run
from personae.serve.settings import ServeSettings
from tests.e2e.helpers import CHARACTER, chat_body
from tests.e2e.test_adapters import adapted_run  # noqa: F401  (the module fixture)


def _flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # in the tensor data, past the header: safetensors itself reads it without complaint
    path.write_bytes(bytes(raw))


def test_an_adapter_is_saved_with_its_sha256_and_checked_on_load(tmp_path: Path) -> None:
    path = save_verified_adapter(tmp_path / "mira.safetensors", {"w": torch.arange(64.0)}, {"inner_params": "lora"})
    assert manifest_path(path) == tmp_path / "mira.sha256.json" and manifest_path(path).is_file()
    assert verify_adapter(path) is True and torch.equal(load_verified_adapter(path)[0]["w"], torch.arange(64.0))
    _flip_a_bit(path)
    with pytest.raises(AdapterError, match=r"mira\.safetensors: damaged, its sha256 does not match mira\.sha256"):
        load_verified_adapter(path)
    save_verified_adapter(path, {"w": torch.arange(64.0)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(AdapterError, match=r"mira\.safetensors: damaged, \d+ bytes where mira\.sha256\.json"):
        load_verified_adapter(path)
    manifest_path(path).write_text('{"bytes": Infinity}')
    with pytest.raises(AdapterError, match="mira.sha256.json: damaged adapter manifest"):
        verify_adapter(path)
    old = save_verified_adapter(tmp_path / "old.safetensors", {"w": torch.ones(2)})
    manifest_path(old).unlink()  # an adapter from before checksums: loaded, unverified
    assert verify_adapter(old) is False and torch.equal(load_verified_adapter(old)[0]["w"], torch.ones(2))


def test_the_server_starts_past_a_damaged_adapter_and_names_it(adapted_run: Path, tmp_path: Path,  # noqa: F811
                                                               caplog: pytest.LogCaptureFixture) -> None:
    run = Path(shutil.copytree(adapted_run, tmp_path / "run"))
    damaged, intact = sorted(p for p in (run / "adapters").glob("*.safetensors"))
    assert manifest_path(damaged).is_file()  # `personae adapt` wrote the checksum
    _flip_a_bit(damaged)
    with caplog.at_level(logging.WARNING):
        app = create_app(run, ServeSettings(), bundle=load_run(run, "cpu"))
    try:
        client = TestClient(app)
        listed = {c["id"]: c["adapter"] for c in client.get("/v1/characters").json()["data"]}
        name = damaged.name.removesuffix(".safetensors")
        assert listed[name].startswith("not applied: ") and "damaged, its sha256" in listed[name]
        assert str(damaged) in caplog.text
        assert listed[intact.name.removesuffix(".safetensors")] == "applied"
        assert client.post("/v1/chat/completions", json=chat_body(model=f"personae/{name}")).status_code == 200
    finally:
        app.state.context.scheduler.stop()


@pytest.mark.parametrize("name, raw", [
    ("infinite.json", b'{"name": "Inf", "description": "x", "extensions": {"depth": 1e999}}'),
    ("nan.json", b'{"name": "Nan", "description": NaN}'),
    ("broken.png", b"\x89PNG\r\n\x1a\n not really"),
    ("deep.json", b'{"name": "Deep", "extensions": ' + b'[' * 500 + b']' * 500 + b'}'),
])
def test_an_old_bad_upload_is_skipped_with_a_warning_and_the_server_starts(make_app, run_copy: Path, name: str,
                                                                           raw: bytes,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    bad = run_copy / "uploads" / name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(raw)  # as a version before strict JSON stored it
    with caplog.at_level(logging.WARNING):
        app = make_app(run=run_copy)
    client = TestClient(app)
    assert str(bad) in caplog.text and "skipping the uploaded card" in caplog.text
    assert bad in app.state.context.registry.skipped
    ids = [c["id"] for c in client.get("/v1/characters").json()["data"]]
    assert CHARACTER in ids and bad.stem not in ids
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
