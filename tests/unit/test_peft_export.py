"""PEFT adapter folders (peft loads ours with the same logits, we read peft's) and `personae export`.

The export tests train real runs through the CLI (`personae finetune` a tiny random Llama and GPT-2,
then `personae adapt` two characters) and load what `personae export` writes in `transformers` / `peft`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
import transformers

from personae.app.cli import main
from personae.data.episodes import examples_file
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.models.export import ExportError, export_run, load_run_with_adapter
from personae.models.generation import SamplingParams, generate
from personae.models.io import MODEL_FILE, load_model
from personae.models.lora import add_decoder_lora, lora_parameters
from personae.models.model import PersonaeModel
from personae.models.peft_format import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    load_peft_adapter,
    read_peft_adapter,
    write_peft_adapter,
)
from tests.hf_folders import gemma3_folder, gpt2_folder, llama_folder, qwen2_folder
from tests.unit.test_hf_decoder import _model, _prompt
from tests.unit.test_hf_lora import IDS, hf_folder, perturb

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["llama", "qwen2", "gpt2", "gemma3_text"]
RUN_FAMILIES = {"llama": llama_folder, "gpt2": gpt2_folder, "gemma3_text": gemma3_folder,  # trained through
                "qwen2": lambda path, words: qwen2_folder(path)}  # the CLI, then exported
CHARACTERS = ("butlertron", "rex-rumbleton")  # characters of the small world with example conversations


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


@pytest.fixture(scope="module")
def lm_folders(small_world, tmp_path_factory) -> dict[str, Path]:
    """A tiny LM of each family; the word-level tokenizers know the world's words (Qwen2's is byte-level)."""
    text = (small_world / "dialogues.jsonl").read_text() + "".join(
        path.read_text() for path in sorted((small_world / "characters").glob("*.json")))
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))
    root = tmp_path_factory.mktemp("lms")
    return {family: build(root / family, words) for family, build in RUN_FAMILIES.items()}


def finetune(pretrained_run: Path, world: Path, lm: Path, out: Path, *extra: str) -> Path:
    """`personae finetune` two steps with LM as the decoder."""
    assert main(["-q", "finetune", str(pretrained_run), "--data", str(world), "--out", str(out),
                 "--model.decoder.kind=hf", f"--model.decoder.path={lm}", "--model.decoder.max_len=1024",
                 "--finetune.train.steps=2", "--finetune.train.batch_size=2", *extra]) == 0
    return out


def adapt(run: Path, world: Path, characters: tuple[str, ...] = CHARACTERS, inner_params: str = "lora") -> Path:
    """`personae adapt` each character from two example conversations (default: fresh LoRA adapters)."""
    for character in characters:
        assert main(["-q", "adapt", str(run), "--card", str(world / "characters" / f"{character}.json"),
                     "--examples", str(examples_file(world / "characters", character)), "-k", "2",
                     "--steps", "2", "--lr", "0.5", "--inner-params", inner_params]) == 0
    return run


@pytest.fixture(scope="module")
def runs(pretrained_run, small_world, lm_folders, tmp_path_factory) -> dict[str, Path]:
    """A fine-tuned run of each family, adapted to CHARACTERS, made by the CLI."""
    root = tmp_path_factory.mktemp("runs")
    return {family: adapt(finetune(pretrained_run, small_world, folder, root / family), small_world)
            for family, folder in lm_folders.items()}


def personae_logits(run: Path, character: str | None) -> torch.Tensor:
    model, _, _ = load_run_with_adapter(run, character)
    with torch.no_grad():
        return model.lm_logits(None, IDS)


@pytest.mark.parametrize("family", sorted(RUN_FAMILIES))
def test_export_merge_writes_a_plain_hf_folder_with_the_adapters_logits(family, runs, tmp_path):
    run, character = runs[family], CHARACTERS[1]
    out = tmp_path / "merged"
    assert main(["export", str(run), "--character", character, "--merge", "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    lm = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected = personae_logits(run, character)
    torch.testing.assert_close(hf_logits(lm), expected, rtol=0, atol=1e-5)
    assert (personae_logits(run, CHARACTERS[0]) - expected).abs().max() > 1e-3  # each character's own adapter
    assert (personae_logits(run, None) - expected).abs().max() > 1e-3  # the adapter is merged in
    tok = HFChatTokenizer(out)  # the chat template came along
    assert tok.prompt_ids([{"role": "user", "content": "hello"}]) == load_model(run)[2].prompt_ids(
        [{"role": "user", "content": "hello"}])
    assert tok.eos_id in lm.generation_config.eos_token_id and not lm.generation_config.do_sample
    prompt = _prompt(tok)
    with torch.no_grad():
        theirs = lm.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt):].tolist()
    model, _, _ = load_run_with_adapter(run, character)
    ours = generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=8)).pop().token_ids
    assert ours == (theirs[: theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs)


@pytest.mark.parametrize("family", sorted(RUN_FAMILIES))
def test_a_fine_tuned_run_exports_its_own_base_beside_the_peft_adapter(family, runs, lm_folders, tmp_path):
    run, character = runs[family], CHARACTERS[0]
    out = export_run(run, tmp_path / "peft", character=character)
    base_folder = json.loads((out / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"]
    assert base_folder == str((out / "base").resolve())  # finetune changed the LM: the folder's is not the run's
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True)
    folder = transformers.AutoModelForCausalLM.from_pretrained(lm_folders[family], local_files_only=True)
    assert (hf_logits(base) - hf_logits(folder)).abs().max() > 1e-4
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(hf_logits(theirs), personae_logits(run, character), rtol=0, atol=1e-5)


def test_export_without_merge_writes_the_peft_adapter_over_the_lm_folder(pretrained_run, small_world, lm_folders,
                                                                        tmp_path):
    """A run whose LM is the folder's, bit for bit (fine-tuned at rate 0): the adapter points at the folder itself."""
    run = finetune(pretrained_run, small_world, lm_folders["llama"], tmp_path / "run", "--finetune.train.lr=0")
    adapt(run, small_world, CHARACTERS[:1])
    out = export_run(run, tmp_path / "peft", character=CHARACTERS[0])
    assert sorted(p.name for p in out.iterdir()) == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    folder = lm_folders["llama"].resolve()
    assert json.loads((out / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"] == str(folder)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(hf_logits(theirs), personae_logits(run, CHARACTERS[0]), rtol=0, atol=1e-5)


def test_export_errors_say_what_is_supported_and_what_is_there(runs, pretrained_run, tmp_path, capsys):
    run = runs["llama"]
    with pytest.raises(ExportError, match=f"no adapter for character 'cid'.*adapters for: {', '.join(CHARACTERS)}"):
        export_run(run, tmp_path / "x", character="cid", merge=True)
    with pytest.raises(ExportError, match="carries no LoRA adapter.*--character ID.*--merge"):
        export_run(run, tmp_path / "x")
    own = shutil.copytree(pretrained_run, tmp_path / "own")  # no decoder: refused before its weights are read
    (own / MODEL_FILE).write_bytes(b"")  # (reading them would fail the checksum)
    assert main(["export", str(own), "--merge", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "supports runs whose decoder is a Hugging Face LM (model.decoder.kind: hf)" in err
    assert "this run's decoder is none (model.decoder.enabled is false)" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_adapter_of_whole_weights_exports_merged_and_is_refused_as_peft(runs, small_world, tmp_path):
    run = adapt(shutil.copytree(runs["llama"], tmp_path / "run"), small_world, ("agent-nightshade",), "all")
    with pytest.raises(ExportError, match="'agent-nightshade'.*holds whole weights, not LoRA.*--merge.*"
                                          "--inner-params lora"):
        export_run(run, tmp_path / "peft", character="agent-nightshade")
    out = export_run(run, tmp_path / "merged", character="agent-nightshade", merge=True)
    lm = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    expected = personae_logits(run, "agent-nightshade")
    assert (personae_logits(run, None) - expected).abs().max() > 1e-3  # the adapter's weights are what is exported
    torch.testing.assert_close(hf_logits(lm), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def meta_runs(runs, small_world, tmp_path_factory) -> dict[str, Path]:
    """`personae meta-train --algo lora-maml` two steps from the fine-tuned Llama and GPT-2 runs (their own LoRA)."""
    root = tmp_path_factory.mktemp("meta")
    for family in ("llama", "gpt2"):
        assert main(["-q", "meta-train", str(runs[family]), "--data", str(small_world), "--out", str(root / family),
                     "--algo", "lora-maml", "--meta.persona_swap=false", "--meta.inner_optimizer=sgd",
                     "--meta.inner_lr=0.05", "--meta.train.steps=2", "--meta.train.warmup_steps=1",
                     "--meta.train.lr=3e-2", "--meta.meta_batch=2", "--meta.support=1", "--meta.query=1",
                     "--meta.inner_steps=1"]) == 0
    return {family: root / family for family in ("llama", "gpt2")}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_lora_maml_run_exports_its_own_lora_for_peft_and_merged(family, meta_runs, tmp_path):
    run = meta_runs[family]
    out = export_run(run, tmp_path / "peft")  # no --character: the run's meta-learned LoRA initialisation
    base_folder = json.loads((out / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"]
    assert base_folder == str((out / "base").resolve())  # meta-training moved the base weights too
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, local_files_only=True)
    plain = hf_logits(base)
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    expected = personae_logits(run, None)
    assert (plain - expected).abs().max() > 1e-4  # the run's LoRA is what makes them equal
    torch.testing.assert_close(hf_logits(theirs), expected, rtol=0, atol=1e-5)
    merged = transformers.AutoModelForCausalLM.from_pretrained(export_run(run, tmp_path / "merged", merge=True),
                                                               local_files_only=True).eval()
    torch.testing.assert_close(hf_logits(merged), expected, rtol=0, atol=1e-5)
