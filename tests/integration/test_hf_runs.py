"""Runs with pretrained parts: pretraining with HF towers, fine-tuning with an HF decoder, every stage from the run."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from personae.app.cli import main
from personae.chat.session import ChatSession, load_run_for_character
from personae.data.hf_tokenizer import HFChatTokenizer, card_messages, prompt_builder
from personae.data.prompt import Turn
from personae.data.tokenizer import Tokenizer
from personae.errors import DataError
from personae.models.generation import SamplingParams
from personae.models.io import CHAT_TOKENIZER_FILE, load_model, write_manifest
from personae.train.pretrain import run_pretrain
from tests.conftest import micro_config
from tests.hf_folders import bert_folder, clip_folder, llama_folder, siglip_folder

TOWERS = {  # name -> overrides (folder placeholders filled in by the test)
    "clip": ["model.vision.kind=clip", "model.vision.path={clip}"],
    "siglip": ["model.vision.kind=siglip", "model.vision.path={siglip}"],
    "bert-locked": ["model.text.kind=hf", "model.text.path={bert}", "model.text.vocab_size=0",
                    "model.text.pooling=mean", "model.text.locked=true"],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, small_world):
    root = tmp_path_factory.mktemp("hf")
    text = (small_world / "dialogues.jsonl").read_text() + "".join(
        path.read_text() for path in sorted((small_world / "characters").glob("*.json")))
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))  # the world's words: replies tokenize without unknowns
    return {"clip": clip_folder(root / "clip"), "siglip": siglip_folder(root / "siglip"),
            "bert": bert_folder(root / "bert"), "llama": llama_folder(root / "llama", words)}


def _overrides(name: str, folders) -> list[str]:
    return [item.format(**folders) for item in TOWERS[name]]


def _tensors(folder, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in load_file(str(folder / "model.safetensors")).items()}


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_pretraining_runs_with_each_pretrained_tower(small_world, folders, tmp_path, name):
    cfg = micro_config("train.steps=3", *_overrides(name, folders))
    state = run_pretrain(small_world, tmp_path / "run", cfg, progress=False)
    assert len(state.history) == 3
    assert all(torch.isfinite(torch.tensor(row[key])) for row in state.history
               for key in ("loss_itc", "loss_itm", "loss_mlm"))
    run = _tensors(tmp_path / "run")
    if name == "bert-locked":
        tokenizer = Tokenizer.from_file(tmp_path / "run" / "tokenizer.json")
        assert tokenizer.mask_id == tokenizer.token_to_id("[MASK]") == 4  # the tower's own mask token
        tower = transformers.AutoTokenizer.from_pretrained(folders["bert"])
        body = tower.encode("A fir tree", add_special_tokens=False)
        assert tokenizer.encode("A fir tree") == [tower.cls_token_id, *body]
        folder = _tensors(folders["bert"], "text.model.")
        kept = {key: value for key, value in folder.items() if ".pooler." not in key}  # the pooler is dropped
        assert len(kept) == len([key for key in run if key.startswith("text.")])
        for key, value in kept.items():  # locked: every weight as the folder has it (grown rows aside)
            assert torch.equal(run[key][: value.shape[0]], value), key
    else:
        folder = _tensors(folders[name], "vision.model.")
        assert cfg.model.vision.width == 32
        assert any(not torch.equal(run[key], value) for key, value in folder.items())  # the tower trained


def test_a_run_with_towers_reloads_exactly_and_a_moved_tower_folder_is_named(small_world, folders, tmp_path):
    clip = shutil.copytree(folders["clip"], tmp_path / "clip")
    bert = shutil.copytree(folders["bert"], tmp_path / "bert")
    cfg = micro_config("train.steps=2", "model.vision.kind=clip", f"model.vision.path={clip}",
                       "model.text.kind=hf", f"model.text.path={bert}", "model.text.vocab_size=0")
    run_pretrain(small_world, tmp_path / "run", cfg, progress=False)
    first, loaded_cfg, tokenizer = load_model(tmp_path / "run")
    second, _, _ = load_model(tmp_path / "run")
    assert (loaded_cfg.model.vision.path, loaded_cfg.model.text.path) == (str(clip), str(bert))
    ids, mask = tokenizer.encode_batch(["a red fir tree", "two boats"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = first.eval()(pixels, ids, mask), second.eval()(pixels, ids, mask)
    assert torch.equal(a.image_embed, b.image_embed) and torch.equal(a.text_embed, b.text_embed)
    shutil.move(clip, tmp_path / "elsewhere")
    with pytest.raises(DataError, match="model.vision.path names does not exist") as error:
        load_model(tmp_path / "run")
    assert str(clip) in str(error.value)


@pytest.fixture(scope="module")
def llama_run(pretrained_run, small_world, folders, tmp_path_factory):
    """A micro pretrained run fine-tuned 3 steps with the tiny Llama as its decoder, through the CLI."""
    llama = shutil.copytree(folders["llama"], tmp_path_factory.mktemp("lm") / "llama")
    out = tmp_path_factory.mktemp("llama_run") / "run"
    main(["-q", "finetune", str(pretrained_run), "--data", str(small_world), "--out", str(out),
          "--model.decoder.kind=hf", f"--model.decoder.path={llama}", "--model.decoder.max_len=1024",
          "--finetune.train.steps=3", "--finetune.train.batch_size=2"])
    return out, llama


def test_a_fine_tuned_llama_run_keeps_its_tokenizer_and_chat_template(llama_run):
    run, llama = llama_run
    model, cfg, tokenizer = load_model(run)
    assert isinstance(tokenizer, HFChatTokenizer) and (run / CHAT_TOKENIZER_FILE).is_file()
    original = HFChatTokenizer(llama)
    messages = card_messages(_card(run), [Turn("where is the fir tree?", "it is there."), Turn("and the boat?")])
    assert tokenizer.prompt_ids(messages) == original.prompt_ids(messages)
    assert tokenizer.example(messages[:3]) == original.example(messages[:3])
    assert tokenizer.eos_id == original.eos_id == original.hf.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.text_tokenizer.vocab_size == cfg.model.text.vocab_size  # the caption tokenizer rides along
    trained, start = _tensors(run), _tensors(llama, "decoder.lm.")
    assert any(not torch.equal(trained[key], value) for key, value in start.items())  # the LM was fine-tuned
    torch.testing.assert_close(model.decoder.lm.get_input_embeddings().weight,
                               trained["decoder.lm.model.embed_tokens.weight"])


def test_chat_eval_and_serve_load_a_llama_run_from_its_folder(llama_run, small_world, tmp_path):
    from fastapi.testclient import TestClient

    from personae.serve.app import create_app

    run, llama = llama_run
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (llama / name).unlink(missing_ok=True)  # the run's own copy is what loads
    character = sorted(path.stem for path in (run / "characters").glob("*.json"))[0]
    model, cfg, tokenizer, card = load_run_for_character(run, character)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    replies = ["".join(ChatSession(model, tokenizer, card, params=greedy).respond("Where is the fir tree?"))
               for _ in range(2)]
    assert replies[0] == replies[1] and replies[0]  # a random LM's reply: deterministic, not empty
    client = TestClient(create_app(run))
    answer = client.post("/v1/chat/completions", json={
        "model": character, "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "user", "content": "Where is the fir tree?"}]})
    assert answer.status_code == 200, answer.text
    prompt = prompt_builder(tokenizer).build(card, [Turn("Where is the fir tree?")], max_tokens=model.text_budget(6),
                                             include_examples=cfg.finetune.include_examples)
    usage = answer.json()["usage"]  # the server renders the same chat-template prompt and replies in full
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(prompt.ids) + model.image_prefix_length(), 6)
    assert answer.json()["choices"][0]["message"]["content"].strip() == replies[0].strip()
    main(["-q", "eval", "roleplay", str(run), "--data", str(small_world), "--limit", "1",
          "--json", str(tmp_path / "roleplay.json")])
    result = json.loads((tmp_path / "roleplay.json").read_text())
    assert result and all(torch.isfinite(torch.tensor(v)) for v in _numbers(result))
    main(["-q", "eval", "retrieval", str(run), "--data", str(small_world), "--json", str(tmp_path / "retrieval.json")])
    retrieval = json.loads((tmp_path / "retrieval.json").read_text())  # captions go through the caption tokenizer
    assert 0 <= retrieval["i2t_r@1"] <= 1


def test_a_llama_run_whose_decoder_folder_moved_names_it(llama_run, tmp_path):
    run, llama = llama_run
    moved = shutil.copytree(run, tmp_path / "run")
    config = json.loads((moved / "config.json").read_text())
    config["model"]["decoder"]["path"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    write_manifest(moved)  # the edited config's checksum
    with pytest.raises(DataError, match="model.decoder.path names does not exist") as error:
        load_model(moved)
    assert str(tmp_path / "gone") in str(error.value)


def _card(run):
    from personae.data.cards import load_card

    return load_card(sorted((run / "characters").glob("*.json"))[0])


def _numbers(tree) -> list[float]:
    """Every number in a JSON tree."""
    if isinstance(tree, dict):
        return [n for value in tree.values() for n in _numbers(value)]
    if isinstance(tree, list):
        return [n for value in tree for n in _numbers(value)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_the_llava_style_preset_runs_pretrain_finetune_and_chat_through_the_cli(small_world, folders, tmp_path):
    small = ["--model.text.width=32", "--model.text.depth=1", "--model.text.heads=2", "--model.text.max_len=40",
             "--model.fusion.heads=2", "--model.fusion.depth=1", "--model.embed_dim=16",
             "--pretrain.tokenizer_vocab=600"]
    main(["-q", "pretrain", "--preset", "hf-llava-style", "--data", str(small_world), "--out", str(tmp_path / "pre"),
          f"--model.vision.path={folders['clip']}", "--train.steps=2", "--train.batch_size=8", "--train.bf16=false",
          *small])
    main(["-q", "finetune", str(tmp_path / "pre"), "--data", str(small_world), "--out", str(tmp_path / "rp"),
          f"--model.decoder.path={folders['llama']}", "--finetune.train.steps=2", "--finetune.train.batch_size=2",
          "--finetune.train.grad_accum=1", "--finetune.train.bf16=false"])
    model, cfg, tokenizer = load_model(tmp_path / "rp")
    assert (cfg.model.vision.kind, cfg.model.decoder.kind, cfg.model.decoder.enabled) == ("clip", "hf", True)
    assert isinstance(tokenizer, HFChatTokenizer) and model.image_prefix_length() == 1 + 4 * 4
    pretrained = _tensors(tmp_path / "pre")
    tuned = _tensors(tmp_path / "rp")
    clip = _tensors(folders["clip"], "vision.model.")
    assert clip and all(torch.equal(pretrained[key], clip[key]) for key in clip)  # model.vision.locked
    assert all(torch.equal(tuned[key], clip[key]) for key in clip)
    character = sorted(path.stem for path in (tmp_path / "rp" / "characters").glob("*.json"))[0]
    model, _, tokenizer, card = load_run_for_character(tmp_path / "rp", character)
    session = ChatSession(model, tokenizer, card, params=SamplingParams(max_new_tokens=4, temperature=0.0))
    assert "".join(session.respond("Where is the fir tree?")) and len(session.history) == 1


def test_the_minilm_lit_preset_runs_pretrain_finetune_and_chat_through_the_cli(small_world, folders, tmp_path):
    small = ["--model.vision.image_size=32", "--model.vision.patch_size=8", "--model.vision.width=32",
             "--model.vision.depth=1", "--model.vision.heads=2", "--model.fusion.heads=2", "--model.fusion.depth=1",
             "--model.decoder.width=32", "--model.decoder.depth=1", "--model.decoder.heads=2",
             "--model.decoder.max_len=2048", "--model.embed_dim=16"]  # letter-by-letter WordPiece: long prompts
    main(["-q", "pretrain", "--preset", "hf-minilm-lit", "--data", str(small_world), "--out", str(tmp_path / "pre"),
          f"--model.text.path={folders['bert']}", "--train.steps=2", "--train.batch_size=8", *small])
    main(["-q", "finetune", str(tmp_path / "pre"), "--data", str(small_world), "--out", str(tmp_path / "rp"),
          "--finetune.train.steps=2", "--finetune.train.batch_size=2"])
    model, cfg, tokenizer = load_model(tmp_path / "rp")
    assert (cfg.model.text.kind, cfg.model.text.locked, cfg.model.decoder.kind) == ("hf", True, "own")
    assert tokenizer.mask_id == tokenizer.token_to_id("[MASK]")  # the tower's tokenizer is the run's
    start, tuned = _tensors(folders["bert"], "text.model."), _tensors(tmp_path / "rp")
    assert all(torch.equal(tuned[key][: value.shape[0]], value) for key, value in start.items() if key in tuned)
    character = sorted(path.stem for path in (tmp_path / "rp" / "characters").glob("*.json"))[0]
    model, _, tokenizer, card = load_run_for_character(tmp_path / "rp", character)
    session = ChatSession(model, tokenizer, card, params=SamplingParams(max_new_tokens=4, temperature=0.0))
    assert "".join(session.respond("Where is the fir tree?")) and len(session.history) == 1
