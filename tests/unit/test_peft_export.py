"""PEFT adapter folders (peft loads ours with the same logits, we read peft's) and `personae export`."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import save_file

from personae.app.cli import main
from personae.config import Config, save_config
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.models.export import ExportError, export_run, load_run_with_adapter
from personae.models.generation import SamplingParams, generate
from personae.models.io import MODEL_FILE, write_manifest
from personae.models.lora import add_decoder_lora, lora_parameters, save_adapter
from personae.models.model import PersonaeModel
from personae.models.peft_format import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    load_peft_adapter,
    read_peft_adapter,
    write_peft_adapter,
)
from tests.conftest import micro_config
from tests.unit.test_hf_decoder import _model, _prompt
from tests.unit.test_hf_lora import IDS, hf_folder, perturb

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["llama", "qwen2", "gpt2", "gemma3_text"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    return {family: hf_folder(tmp_path_factory, family) for family in FAMILIES}


def adapted(folder: Path, seed: int = 1) -> PersonaeModel:
    model = _model(folder)
    add_decoder_lora(model, 2, 4.0)
    perturb(model, seed)
    return model


def hf_logits(lm: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=IDS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter_folder_with_the_same_logits(family, folders, tmp_path):
    model = adapted(folders[family])
    out = write_peft_adapter(model, tmp_path / "adapter", folders[family])
    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (2, 4.0, str(folders[family]))
    assert config["target_modules"] == (["c_attn", "c_proj"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj",
                                                                                        "o_proj"])
    with torch.no_grad():
        ours = model.lm_logits(None, IDS)
    base = transformers.AutoModelForCausalLM.from_pretrained(folders[family], local_files_only=True)
    assert (hf_logits(base) - ours).abs().max() > 1e-3  # the adapter is what makes them equal
    theirs = peft.PeftModel.from_pretrained(base, out).eval()  # (wraps base's layers in place)
    torch.testing.assert_close(hf_logits(theirs), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_peft_made_reads_into_personae_with_the_same_logits(family, folders, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(folders[family], local_files_only=True)
    targets = ["c_attn", "c_proj"] if family == "gpt2" else ["q_proj", "v_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                             fan_in_fan_out=family == "gpt2")
    theirs = peft.get_peft_model(base, config).eval()  # init_lora_weights=False: B is random, not zero
    theirs.save_pretrained(tmp_path / "peft")
    tensors, metadata = read_peft_adapter(tmp_path / "peft")
    assert metadata["lora_rank"] == "4" and all(name.startswith("decoder.lm.") for name in tensors)
    model = _model(folders[family])
    load_peft_adapter(model, tmp_path / "peft")
    assert set(lora_parameters(model)) == set(tensors)  # exactly the layers the folder names
    with torch.no_grad():
        torch.testing.assert_close(model.lm_logits(None, IDS), hf_logits(theirs), rtol=0, atol=1e-5)


def test_a_peft_folder_that_is_not_plain_lora_is_refused(folders, tmp_path):
    write_peft_adapter(adapted(folders["llama"]), tmp_path, folders["llama"])
    config = json.loads((tmp_path / PEFT_CONFIG_FILE).read_text())
    (tmp_path / PEFT_CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(Exception, match="use_dora=True is not supported"):
        read_peft_adapter(tmp_path)
    with pytest.raises(Exception, match="no adapter_config.json"):
        read_peft_adapter(tmp_path / "nothing")


def make_run(folder: Path, root: Path, *, tune_lm: bool = False) -> Path:
    """A run folder as training writes it (config.json, model.safetensors, checkpoint.json), with two adapters."""
    run = root / "run"
    run.mkdir()
    model = _model(folder)
    if tune_lm:  # a full fine-tune changed the LM's own weights
        with torch.no_grad():
            model.decoder.lm.get_input_embeddings().weight.mul_(1.5)
    save_config(Config(model=model.cfg), run / "config.json")
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(run / MODEL_FILE))  # GPT-2 ties two
    write_manifest(run)
    add_decoder_lora(model, 2, 4.0)
    for seed, character in ((1, "ada"), (2, "bob")):
        perturb(model, seed, scale=0.5)
        save_adapter(run / "adapters" / f"{character}.safetensors", lora_parameters(model),
                     {"inner_params": "lora", "lora_rank": 2, "lora_alpha": 4.0})
    return run


def personae_logits(run: Path, character: str) -> torch.Tensor:
    model, _ = load_run_with_adapter(run, character)
    with torch.no_grad():
        return model.lm_logits(None, IDS)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_merge_writes_a_plain_hf_folder_with_the_adapters_logits(family, folders, tmp_path):
    run = make_run(folders[family], tmp_path)
    out = tmp_path / "merged"
    assert main(["export", str(run), "--character", "bob", "--merge", "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    lm = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected = personae_logits(run, "bob")
    torch.testing.assert_close(hf_logits(lm), expected, rtol=0, atol=1e-5)
    assert (personae_logits(run, "ada") - expected).abs().max() > 1e-3  # each character's own adapter
    tok = HFChatTokenizer(out)  # the chat template came along
    assert tok.eos_id in lm.generation_config.eos_token_id and not lm.generation_config.do_sample
    prompt = _prompt(tok)
    with torch.no_grad():
        theirs = lm.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt):].tolist()
    model, _ = load_run_with_adapter(run, "bob")
    ours = generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=8)).pop().token_ids
    assert ours == (theirs[: theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs)


def test_export_without_merge_writes_the_peft_adapter_over_the_lm_folder(folders, tmp_path):
    run = make_run(folders["llama"], tmp_path)
    out = export_run(run, tmp_path / "peft", character="ada")
    assert sorted(p.name for p in out.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    assert json.loads((out / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"] == str(folders["llama"].resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"], local_files_only=True)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(hf_logits(theirs), personae_logits(run, "ada"), rtol=0, atol=1e-5)


def test_a_run_that_tuned_the_lm_exports_its_own_base_beside_the_peft_adapter(folders, tmp_path):
    run = make_run(folders["llama"], tmp_path, tune_lm=True)
    out = export_run(run, tmp_path / "peft", character="ada")
    base_folder = json.loads((out / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"]
    assert base_folder == str((out / "base").resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(hf_logits(theirs), personae_logits(run, "ada"), rtol=0, atol=1e-5)


def test_export_errors_say_what_is_supported_and_what_is_there(folders, tmp_path, capsys):
    run = make_run(folders["llama"], tmp_path)
    own = tmp_path / "own"  # a run of personae's own decoder: refused before its weights are read
    own.mkdir()
    save_config(micro_config(), own / "config.json")
    (own / MODEL_FILE).write_bytes(b"")
    with pytest.raises(ExportError, match="no adapter for character 'cid'.*adapters for: ada, bob"):
        export_run(run, tmp_path / "x", character="cid", merge=True)
    with pytest.raises(ExportError, match="carries no LoRA adapter.*--character ID.*--merge"):
        export_run(run, tmp_path / "x")
    assert main(["export", str(own), "--merge", "--out", str(tmp_path / "y")]) == 2
    assert "supports runs whose decoder is a Hugging Face LM (model.decoder.kind: hf)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
