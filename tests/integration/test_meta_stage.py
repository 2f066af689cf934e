"""Meta-training, adaptation to a new character, and adaptation evaluation, end to end on a micro model."""

from __future__ import annotations

import contextlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from personae.app.cli import main
from personae.chat.session import load_run_for_character
from personae.config import apply_overrides, load_preset
from personae.data.cards import load_card
from personae.data.episodes import examples_file
from personae.errors import DataError, PersonaeError
from personae.meta.adapt import Adaptation, AdaptSpec, adapt_to_character, learned_rates, support_batch
from personae.models.generation_config import read_generation_config
from personae.models.io import load_model
from personae.models.lora import load_adapter, lora_settings
from personae.train.adapt import adapt_character, read_examples
from personae.train.finetune import run_config, run_finetune
from personae.train.meta import run_meta_train

# the LoRA recipe (per-row servable adapters), not the preset's full-parameter one
META = ["meta.persona_swap=false", "meta.algo=lora-maml", "meta.inner_optimizer=sgd", "meta.inner_lr=0.05",
        "meta.train.steps=6", "meta.train.warmup_steps=1", "meta.train.lr=3e-3", "meta.train.log_every=1",
        "meta.train.save_every=3", "meta.meta_batch=2", "meta.support=2", "meta.query=2", "meta.inner_steps=1",
        "meta.learn_inner_lr=true"]
HELDOUT = "rex-rumbleton"  # a held-out character of the small world with 5 test conversations


def settings(run, overrides):
    """RUN's own config with dotted overrides: what the CLI hands a stage."""
    return apply_overrides(run_config(run), overrides)


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits on the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def meta_run(pretrained_run, small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta")
    with one_thread():
        state = run_meta_train(pretrained_run, small_world, out, settings(pretrained_run, META), progress=False)
    return out, state


@pytest.fixture(scope="module")
def multitask_run(pretrained_run, small_world, tmp_path_factory):
    """The same budget of ordinary fine-tuning: 6 steps of 8 conversations (2 tasks x (2 + 2))."""
    out = tmp_path_factory.mktemp("multitask")
    with one_thread():
        run_finetune(pretrained_run, small_world, out, settings(pretrained_run, ["finetune.train.steps=6", *META[:4]]),
                     progress=False)
    return out


def _card_and_examples(world, character=HELDOUT):
    return world / "characters" / f"{character}.json", examples_file(world / "characters", character)


def _logits(model, batch):
    with torch.no_grad():
        return model.eval().lm_logits(batch.get("pixel_values"), batch["input_ids"])


def test_meta_train_loss_is_finite_falls_and_the_run_reloads_with_lora(meta_run):
    out, state = meta_run
    losses = [row["loss"] for row in state.history]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    model, cfg, _ = load_model(out)
    assert cfg.model.lora_rank == 4 and lora_settings(model) == {"rank": 4, "alpha": 8.0}
    assert read_generation_config(out).max_repeats == cfg.finetune.max_repeats  # written, not the fallback file
    assert (out / "generation_config.json").exists()
    rates = load_file(str(out / "meta_lrs.safetensors"))  # Meta-SGD: one rate per adapted element
    assert rates and all(key.endswith(("lora_A", "lora_B")) for key in rates)
    assert any(not torch.allclose(v, torch.full_like(v, 0.05)) for v in rates.values())  # they were learned


def test_meta_train_resumes_exactly(meta_run, pretrained_run, small_world, tmp_path):
    out, state = meta_run
    run_meta_train(pretrained_run, small_world, tmp_path, settings(pretrained_run, META), progress=False, stop_at=3)
    resumed = run_meta_train(pretrained_run, small_world, tmp_path, settings(pretrained_run, META), progress=False,
                             resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in state.history]
    for name in ("model.safetensors", "meta_lrs.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(tmp_path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_meta_training_a_meta_run_again_starts_from_its_learned_rates(meta_run, small_world, tmp_path):
    out, _ = meta_run
    learned = learned_rates(out)
    assert any(not torch.allclose(v, torch.full_like(v, 0.05)) for v in learned.values())  # they did move
    # one outer step at a negligible rate: the rates it saves are the ones it started from
    run_meta_train(out, small_world, tmp_path, settings(out, [*META, "meta.train.steps=1", "meta.train.lr=1e-12"]),
                   progress=False)
    again = learned_rates(tmp_path)
    assert again.keys() == learned.keys()
    assert all(torch.allclose(again[k], learned[k], atol=1e-9) for k in learned)


def test_persona_swapped_meta_training_is_deterministic_and_trains_on_other_text(meta_run, pretrained_run, small_world, tmp_path):
    swap = META + ["meta.train.steps=2", "meta.persona_swap=true"]
    first = run_meta_train(pretrained_run, small_world, tmp_path / "a", settings(pretrained_run, swap), progress=False)
    again = run_meta_train(pretrained_run, small_world, tmp_path / "b", settings(pretrained_run, swap), progress=False)
    plain = meta_run[1].history[:2]
    assert [r["loss"] for r in first.history] == [r["loss"] for r in again.history]  # swaps are drawn by step
    # the same episodes with fresh markers: other text, other losses
    assert all(s["loss"] != p["loss"] for s, p in zip(first.history, plain)), (first.history, plain)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["meta"]["persona_swap"] is True


def test_persona_swap_needs_a_scene_world(pretrained_run, small_world, tmp_path):
    data = tmp_path / "plain"
    shutil.copytree(small_world, data, ignore=shutil.ignore_patterns("world.json"))
    with pytest.raises(PersonaeError, match="persona_swap needs a scene world"):
        run_meta_train(pretrained_run, data, tmp_path / "out",
                       settings(pretrained_run, META + ["meta.persona_swap=true"]),
                       progress=False)


def test_adapter_reloads_to_identical_outputs_and_zero_steps_is_a_no_op(meta_run, small_world):
    out, _ = meta_run
    card_path, examples = _card_and_examples(small_world)
    path = adapt_character(out, card_path, examples, k=5, steps=3, progress=False)
    assert path == out / "adapters" / f"{HELDOUT}.safetensors"
    tensors, metadata = load_adapter(path)
    assert tensors and all(name.startswith("decoder.") and name.endswith(("lora_A", "lora_B")) for name in tensors)
    assert metadata["k"] == "5" and metadata["steps"] == "3" and metadata["lr"] == "learned"
    assert (out / "characters" / card_path.name).exists()  # chat finds it by name now

    base, cfg, tokenizer = load_model(out)
    card = load_card(card_path)
    batch = support_batch(read_examples(examples, HELDOUT, card, 5), card, base, cfg, tokenizer)
    adaptation = Adaptation(base, cfg, AdaptSpec.of(cfg), learned_rates(out))
    *_, fast = adaptation.steps(batch, 3)
    expected = _logits(adaptation.adapted_model(fast), batch)
    loaded, _, _, loaded_card = load_run_for_character(out, card.name)
    assert loaded_card.name == card.name
    assert torch.equal(_logits(loaded, batch), expected)

    adapt_character(out, card_path, examples, k=5, steps=0, progress=False)
    unadapted = load_run_for_character(out, HELDOUT)[0]
    assert torch.equal(_logits(unadapted, batch), _logits(load_model(out)[0], batch))


def test_adapting_in_memory_gives_the_tensors_personae_adapt_writes(meta_run, small_world, tmp_path):
    """The library function on a loaded model (images, learned rates) = the file wrapper, and it writes nothing."""
    out, _ = meta_run
    run = shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("adapters", "checkpoints"))
    card_path, examples = _card_and_examples(small_world)
    model, cfg, tokenizer = load_model(run)
    card = load_card(card_path)
    records = read_examples(examples, HELDOUT, card, 3)
    assert records[0].image is not None
    files_before = sorted(p for p in run.rglob("*"))
    adapter = adapt_to_character(model, cfg, tokenizer, card, records, character_id=HELDOUT, steps=2,
                                 learned_lrs=learned_rates(run))
    assert sorted(p for p in run.rglob("*")) == files_before
    assert adapter.metadata["lr"] == "learned" and adapter.metadata["inner_params"] == "lora"
    tensors, metadata = load_adapter(adapt_character(run, card_path, examples, k=3, steps=2, progress=False))
    assert tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(tensors[k], adapter.tensors[k]) for k in tensors)
    assert metadata == {k: str(v) for k, v in adapter.metadata.items()}


def test_adapting_lowers_the_query_loss_of_a_heldout_character(multitask_run, small_world):
    from personae.data.dialogues import read_dialogues

    card_path, examples = _card_and_examples(small_world)
    base, cfg, tokenizer = load_model(multitask_run)
    card = load_card(card_path)
    query = [r for r in read_dialogues(small_world / "dialogues.jsonl", split="test") if r.character == HELDOUT]
    batch = support_batch(query, card, base, cfg, tokenizer)
    loss_before = Adaptation(base, cfg, AdaptSpec.of(cfg, inner_params="head")).loss({}, batch)
    adapt_character(multitask_run, card_path, examples, k=5, steps=10, lr=0.05, inner_params="all", progress=False)
    adapted = load_run_for_character(multitask_run, HELDOUT)[0]
    loss_after = Adaptation(adapted, cfg, AdaptSpec.of(cfg, inner_params="head")).loss({}, batch)
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)


def test_a_run_without_lora_gets_fresh_adapters_that_chat_rebuilds(multitask_run, small_world):
    """A fine-tuned run adapts LoRA by default (its config's algorithm): fresh adapters, added again on load."""
    card_path, examples = _card_and_examples(small_world)
    path = adapt_character(multitask_run, card_path, examples, k=2, steps=2, lr=0.5, progress=False)
    assert load_adapter(path)[1]["lora_added"] == "True"
    base = load_model(multitask_run)[0]
    assert lora_settings(base) is None
    adapted = load_run_for_character(multitask_run, HELDOUT)[0]
    assert lora_settings(adapted) == {"rank": 4, "alpha": 8.0}
    batch = {"input_ids": torch.arange(3, 40)[None]}
    assert not torch.equal(_logits(adapted, batch), _logits(base, batch))


def test_eval_adaptation_writes_every_k_and_step_and_the_plot(meta_run, multitask_run, small_world, tmp_path, capsys):
    out, _ = meta_run
    argv = ["-q", "eval", "adaptation", str(out), "--baseline", str(multitask_run), "--data", str(small_world),
            "-k", "1", "2", "--steps", "0", "1", "3", "--generate-k", "2", "--generate-steps", "0", "3",
            "--query", "1", "--characters", HELDOUT, "tumblewick", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "adaptation.json").read_text())
    assert set(result["query_loss"]) == {"meta", "multitask", "none"}
    for label, by_k in result["query_loss"].items():
        assert set(by_k) == {"1", "2"} and all(set(row) == {"0", "1", "3"} for row in by_k.values()), label
        assert all(math.isfinite(v) for row in by_k.values() for v in row.values())
        assert set(result["metrics"][label]["2"]) == {"0", "3"}
        assert 0.0 <= result["metrics"][label]["2"]["3"]["persona_consistency"] <= 1.0
    assert result["query_loss"]["none"]["2"]["3"] == result["query_loss"]["multitask"]["2"]["0"]
    assert set(result["per_character"]["meta"]) == {HELDOUT, "tumblewick"}
    png = (tmp_path / "adaptation.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert "k = 2: mean query loss" in capsys.readouterr().out


def test_shakespeare_track_reports_per_speaker_perplexity(multitask_run, tmp_path, capsys):
    """`personae shakespeare build`, then `eval adaptation` on it: the text-only track (no images anywhere)."""
    bard = tmp_path / "bard"
    assert main(["-q", "shakespeare", "build", str(bard), "--min-speeches", "150", "--heldout", "2",
                 "--examples", "3"]) == 0
    assert main(["-q", "eval", "adaptation", str(multitask_run), "--data", str(bard), "-k", "1", "2",
                 "--steps", "0", "2", "--query", "2", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "adaptation.json").read_text())
    assert result["track"] == "shakespeare" and not result["metrics"] and len(result["characters"]) == 2
    for speaker in result["characters"]:
        perplexity = result["perplexity"]["meta"][speaker]["2"]
        assert set(perplexity) == {"0", "2"} and perplexity["2"] < perplexity["0"]
        assert result["perplexity"]["none"][speaker]["2"]["2"] == perplexity["0"]
    assert "per-speaker perplexity at k = 2, 2 steps" in capsys.readouterr().out


def test_bad_example_files_name_the_file_and_line(meta_run, small_world, tmp_path, capsys):
    out, _ = meta_run
    card_path, examples = _card_and_examples(small_world)
    good = []  # the rows with absolute image paths, so that they can move to another folder
    for line in examples.read_text().splitlines():
        row = json.loads(line)
        good.append(json.dumps({**row, "image": str((examples.parent / row["image"]).resolve())}))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good[0] + "\n{not json\n")
    with pytest.raises(DataError, match=f"{broken}:2"):
        adapt_character(out, card_path, broken, k=1, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(good[0] + "\n" + good[1].replace(HELDOUT, "tumblewick") + "\n")
    with pytest.raises(DataError, match=f"{other}:2: conversation of character 'tumblewick'"):
        adapt_character(out, card_path, other, k=1, progress=False)
    single = tmp_path / "single.jsonl"
    single.write_text(good[0] + "\n")
    with pytest.raises(DataError, match=f"{single}: 1 example conversation.*fewer than k = 5"):
        adapt_character(out, card_path, single, k=5, progress=False)
    moved = tmp_path / "moved.jsonl"
    moved.write_text(examples.read_text())  # relative image paths that no longer resolve
    with pytest.raises(DataError, match=f"{moved}:1: image file not found"):
        adapt_character(out, card_path, moved, k=1, progress=False)
    code = main(["-q", "adapt", str(out), "--card", str(card_path), "--examples", str(broken), "-k", "1"])
    assert code == 2 and f"{broken}:2" in capsys.readouterr().err


def test_meta_config_round_trips_and_takes_yaml_words_as_strings():
    cfg = apply_overrides(load_preset("tiny"), ["meta.vmap=off", "meta.algo=anil", "meta.train.lr=1e-4",
                                                "meta.first_order=on"])
    assert cfg.meta.vmap == "off" and cfg.meta.algo == "anil" and cfg.meta.first_order is True
    assert cfg.meta.train.lr == 1e-4 and cfg.model.lora_rank == 0


def test_the_adapt_command_takes_inner_params_and_no_other_name(meta_run, small_world, tmp_path, capsys):
    out, _ = meta_run
    run = shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("adapters", "checkpoints"))
    card_path, examples = _card_and_examples(small_world)
    argv = ["-q", "adapt", str(run), "--card", str(card_path), "--examples", str(examples), "-k", "2", "--steps", "1"]
    assert main([*argv, "--inner-params", "head"]) == 0
    tensors, metadata = load_adapter(run / "adapters" / f"{HELDOUT}.safetensors")
    assert metadata["inner_params"] == "head" and set(tensors) == {"decoder.ln_f.weight", "decoder.ln_f.bias"}
    with pytest.raises(SystemExit):
        main([*argv, "--params", "head"])
    assert "unrecognised arguments: --params" in capsys.readouterr().err
