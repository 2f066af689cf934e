"""Role-play end to end on a small world: fine-tuning lowers the loss, evaluation and chat run on the result."""

import io
import json

import pytest

from personae.app.cli import main
from personae.chat.session import CharacterNotFound, ChatSession, find_character, run_terminal_chat
from personae.config import apply_overrides
from personae.models.generation_config import GenerationDefaults, read_generation_config
from personae.models.io import load_model
from personae.train.finetune import run_config, run_finetune


@pytest.fixture(scope="module")
def finetuned(pretrained_run, small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned")
    cfg = apply_overrides(run_config(pretrained_run), ["finetune.train.steps=25"])
    state = run_finetune(pretrained_run, small_world, out, cfg, progress=False)
    return out, state


def test_finetuning_lowers_the_reply_loss(finetuned):
    out, state = finetuned
    losses = [row["loss"] for row in state.history]
    assert len(losses) == 25 and sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    model, cfg, _ = load_model(out)
    assert model.decoder is not None and cfg.model.decoder.enabled
    assert (out / "characters" / "captain-saltbeard.json").exists() or any((out / "characters").glob("*.json"))
    # the run recommends what evaluation decodes with: greedy with loop breaking
    assert read_generation_config(out) == GenerationDefaults(temperature=0.0, max_repeats=cfg.finetune.max_repeats,
                                                             max_new_tokens=cfg.finetune.max_new_tokens)
    assert (out / "generation_config.json").exists()


def test_eval_roleplay_scores_seen_and_heldout(finetuned, small_world, capsys):
    out, _ = finetuned
    assert main(["-q", "eval", "roleplay", str(out), "--data", str(small_world), "--limit", "3"]) == 0
    result = json.loads((out / "eval" / "roleplay.json").read_text())
    assert set(result["metrics"]) == {"train", "heldout"}
    for split in ("train", "heldout"):
        overall = result["metrics"][split]["overall"]
        assert 0.0 <= overall["persona_consistency"] <= 1.0 and overall["n"] >= 3
        assert result["fluency_perplexity"][split] > 1.0
    assert result["samples"][0]["reply"] is not None
    assert "held-out characters" in capsys.readouterr().out


def test_terminal_chat_streams_and_handles_commands(finetuned, small_world):
    out, _ = finetuned
    model, _, tokenizer = load_model(out)
    card = find_character(out, next((out / "characters").glob("*.json")).stem)
    session = ChatSession(model, tokenizer, card)
    image = next((small_world / "images").glob("*.png"))
    lines = iter(["How many dogs do you see?", f"/image {image}", "/card", "Who are you?", "/reset", "/quit"])
    buffer = io.StringIO()
    run_terminal_chat(session, read=lambda prompt: next(lines), out=buffer)
    text = buffer.getvalue()
    assert f"Chatting with {card.name}" in text and f"(now looking at {image})" in text
    assert "(conversation reset)" in text and session.history == []
    assert text.count(f"{card.name}: ") >= 2


def test_terminal_chat_with_a_too_long_card_notes_the_cut_and_answers(finetuned):
    import dataclasses

    out, _ = finetuned
    model, _, tokenizer = load_model(out)
    card = find_character(out, next((out / "characters").glob("*.json")).stem)
    long_card = dataclasses.replace(card, description="A very long story of the sea. " * 300)
    lines = iter(["Hello?", "And now?", "/quit"])
    buffer = io.StringIO()
    run_terminal_chat(ChatSession(model, tokenizer, long_card), read=lambda prompt: next(lines), out=buffer)
    text = buffer.getvalue()
    assert text.count(f"{card.name}: ") >= 2  # both messages answered, not refused
    assert text.count("(note: the description was cut") == 1  # said once, while the cut stays the same


def test_unknown_character_lists_the_known_ones(finetuned):
    out, _ = finetuned
    with pytest.raises(CharacterNotFound, match="known: "):
        find_character(out, "Nobody Atall")


def test_persona_swapped_finetuning_trains_on_other_text_and_needs_a_scene_world(pretrained_run, small_world,
                                                                                  tmp_path, capsys):
    import shutil

    from personae.errors import PersonaeError

    runs = {}
    for fraction in (0.0, 1.0):
        swap = ["finetune.train.steps=2", f"finetune.persona_swap={fraction}"]
        cfg = apply_overrides(run_config(pretrained_run), swap)
        runs[fraction] = run_finetune(pretrained_run, small_world, tmp_path / f"swap{fraction}", cfg, progress=True)
    assert "conversations speak with fresh markers" in capsys.readouterr().out
    plain, swapped = ([row["loss"] for row in runs[f].history] for f in (0.0, 1.0))
    assert plain != swapped  # same batches, other replies
    assert json.loads((tmp_path / "swap1.0" / "config.json").read_text())["finetune"]["persona_swap"] == 1.0
    data = tmp_path / "plain"
    shutil.copytree(small_world, data, ignore=shutil.ignore_patterns("world.json"))
    with pytest.raises(PersonaeError, match="persona_swap needs a scene world"):
        run_finetune(pretrained_run, data, tmp_path / "out", apply_overrides(run_config(pretrained_run),
                     ["finetune.persona_swap=0.5"]), progress=False)


def test_each_stage_reads_its_own_compile_key(pretrained_run, small_world, tmp_path, monkeypatch):
    import torch

    from personae.tasks import RolePlayTask

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    base = ["finetune.train.steps=1", "finetune.train.save_every=1", "train.compile=true"]
    run_finetune(pretrained_run, small_world, tmp_path / "plain", apply_overrides(run_config(pretrained_run), base),
                 progress=False)
    assert compiled == []  # train.compile is pretraining's, not fine-tuning's
    cfg = apply_overrides(run_config(pretrained_run), [*base, "finetune.train.compile=true"])
    run_finetune(pretrained_run, small_world, tmp_path / "compiled", cfg, progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], RolePlayTask)


def test_region_word_alignment_and_content_weighting_train_on_a_scene_world(pretrained_run, small_world,
                                                                             tmp_path):
    import shutil

    from personae.errors import DataError

    steps = ["finetune.train.steps=12", "finetune.align_weight=1.0", "finetune.content_weight=3.0"]
    state = run_finetune(pretrained_run, small_world, tmp_path / "aligned", apply_overrides(run_config(pretrained_run),
                         steps), progress=False)
    losses = [row["loss_align"] for row in state.history]
    assert len(losses) == 12 and losses[-1] < losses[0]  # the prefix learns to read out the scene's names
    assert all(row["loss"] > row["loss_lm"] for row in state.history)  # the weighted alignment is added
    # a plain folder names its images' things in an optional "objects" key; a bad one names the conversation
    data = tmp_path / "plain"
    shutil.copytree(small_world, data, ignore=shutil.ignore_patterns("world.json"))
    rows = [json.loads(line) for line in (data / "dialogues.jsonl").read_text().splitlines()]
    rows[0]["objects"] = "backpack"
    (data / "dialogues.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    plain = [*steps, "finetune.persona_swap=0", "finetune.content_weight=1"]
    with pytest.raises(DataError, match=f"conversation '{rows[0]['id']}': \"objects\" must be a list"):
        run_finetune(pretrained_run, data, tmp_path / "bad", apply_overrides(run_config(pretrained_run), plain),
                     progress=False)
    from personae.errors import PersonaeError

    with pytest.raises(PersonaeError, match="content_weight weighs the content words"):  # a plain folder names none
        run_finetune(pretrained_run, data, tmp_path / "bad", apply_overrides(run_config(pretrained_run),
                     [*plain, "finetune.align_weight=0", "finetune.content_weight=3"]), progress=False)



def test_a_new_decoder_starts_from_the_text_tower_only_when_asked(pretrained_run):
    import torch

    from personae.train.finetune import model_with_decoder

    seeded, _, _ = model_with_decoder(pretrained_run, apply_overrides(run_config(pretrained_run),
                                                                       ["finetune.decoder_from_text=true"]))
    fresh, _, _ = model_with_decoder(pretrained_run, apply_overrides(run_config(pretrained_run),
                                                                      ["finetune.decoder_from_text=false"]))
    text = seeded.text.tok_embed.weight
    assert torch.equal(seeded.decoder.tok_embed.weight, text)
    assert not torch.equal(fresh.decoder.tok_embed.weight, text)
    assert torch.equal(fresh.text.tok_embed.weight, text)  # the pretrained towers load either way
