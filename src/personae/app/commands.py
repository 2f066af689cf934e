"""What each `personae` command does once its arguments are parsed (cli.py only parses)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personae.config import Config
from personae.data.cards import load_card
from personae.data.convert import ConvertReport, convert
from personae.data.kinds import open_data
from personae.data.manifest import read_pairs
from personae.eval.grounding import evaluate_grounding, format_grounding_table, save_grounding
from personae.eval.retrieval import evaluate_retrieval, format_table, save_result
from personae.eval.roleplay import evaluate_roleplay, format_roleplay_table
from personae.models.export import export_run
from personae.models.generation import SamplingParams
from personae.models.generation_config import read_generation_config, recommended_generation
from personae.models.io import caption_tokenizer, load_model
from personae.train.distributed import pick_device


def evaluate_run(run: Path, data: Path, *, split: str = "test", out: Path | None = None, batch_size: int = 128,
                 progress: bool = True) -> dict[str, float]:
    """`personae eval retrieval`: load RUN, score the split, print the table, save JSON."""
    model, _, tokenizer = load_model(run, pick_device())
    manifest = read_pairs(Path(data) / "pairs.jsonl").filter(split)
    # a run with a Hugging Face decoder loads its chat tokenizer; captions need the text tower's
    result = evaluate_retrieval(model, caption_tokenizer(tokenizer), manifest, batch_size=batch_size, progress=progress)
    path = save_result(result, out or Path(run) / "eval" / "retrieval.json")
    print(f"retrieval on the {split} split of {data}:\n{format_table(result)}\nsaved: {path}")
    return result


def evaluate_roleplay_run(run: Path, data: Path, *, split: str = "test", out: Path | None = None,
                          limit: int | None = None, batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """`personae eval roleplay`: generate and score every reply of the split, print and save."""
    model, cfg, tokenizer = load_model(run, pick_device())
    result = evaluate_roleplay(model, tokenizer, Path(data), split=split, limit=limit, batch_size=batch_size,
                               max_new_tokens=cfg.finetune.max_new_tokens,
                               include_examples=cfg.finetune.include_examples,
                               max_repeats=cfg.finetune.max_repeats, progress=progress)
    path = Path(out or Path(run) / "eval" / "roleplay.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"role-play on the {split} split of {data}:\n{format_roleplay_table(result)}\nsaved: {path}")
    return result


def evaluate_grounding_run(run: Path, data: Path, *, split: str = "test", out: Path | None = None,
                           limit: int | None = 32, batch_size: int = 8, seed: int = 0,
                           progress: bool = True) -> dict[str, Any]:
    """`personae eval grounding`: reply loss with the true / shuffled / blank image, attention; print, save."""
    model, cfg, tokenizer = load_model(run, pick_device())
    result = evaluate_grounding(model, tokenizer, Path(data), split=split, limit=limit, batch_size=batch_size,
                                seed=seed, include_examples=cfg.finetune.include_examples, progress=progress)
    path = save_grounding(result, Path(out or Path(run) / "eval" / "grounding.json"))
    print(f"what the image is worth on the {split} split of {data}:\n{format_grounding_table(result)}\nsaved: {path}")
    return result


def chat(run: Path, character: str, *, image: Path | None = None, temperature: float | None = None,
         top_p: float | None = None, max_tokens: int | None = None, seed: int | None = None,
         user: str = "User") -> None:
    """`personae chat`: an interactive terminal chat that streams the replies (sampling: the run's
    generation_config.json, with the options given in its place)."""
    from personae.chat.session import ChatSession, load_run_for_character, run_terminal_chat

    model, cfg, tokenizer, card = load_run_for_character(run, character, pick_device())
    params = chat_params(run, cfg, temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, seed=seed)
    session = ChatSession(model, tokenizer, card, params=params, user=user,
                          include_examples=cfg.finetune.include_examples)
    if image is not None:
        session.set_image(image)
    run_terminal_chat(session)


def chat_params(run: Path, cfg: Config, *, seed: int | None = None, **given: float | None) -> SamplingParams:
    """The run's recommended sampling (generation_config.json; without one, what evaluation uses) with
    every `given` value that is not None in its place."""
    defaults = read_generation_config(run, recommended_generation(cfg))
    return SamplingParams(seed=seed, **defaults.with_overrides(**given))


def meta_train(run: Path, data: Path, out: Path, cfg: Config | None = None, *, resume: bool = False,
               progress: bool = True) -> None:
    """`personae meta-train`: meta-train RUN over the training characters (settings: cfg, else RUN's); print."""
    from personae.train.meta import run_meta_train

    state = run_meta_train(Path(run), Path(data), Path(out), cfg, resume=resume, progress=progress)
    last = state.history[-1] if state.history else {}
    print(f"meta-trained {state.step} steps, final meta-loss {last.get('loss', float('nan')):.4f}; run: {out}")


def adapt(run: Path, card: Path, examples: Path, *, k: int = 5, steps: int = 10, lr: float | None = None,
          inner_params: str | None = None, progress: bool = True) -> Path:
    """`personae adapt`: adapt RUN to a new character from its card and k examples; print where it went."""
    from personae.train.adapt import adapt_character

    path = adapt_character(Path(run), Path(card), Path(examples), k=k, steps=steps, lr=lr, inner_params=inner_params,
                           progress=progress)
    print(f"adapter written: {path}\nchat with it: personae chat {run} --character {Path(card).stem}")
    return path


def evaluate_adaptation_run(run: Path, data: Path, *, baseline: Path | None = None, none: Path | None = None,
                            ks: list[int] | None = None, steps: list[int] | None = None,
                            generate_ks: list[int] | None = None, generate_steps: list[int] | None = None,
                            query: int | None = None, characters: list[str] | None = None, lr: float | None = None,
                            out: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """`personae eval adaptation`: curves of RUN (and the baseline) on held-out characters; table, JSON, PNG.

    Data with exact metrics (a scene world) gets them; other data (the Shakespeare set) the text-only track.
    """
    from personae.eval import adaptation as evaluation

    runs = {"meta": Path(run)} | ({"multitask": Path(baseline)} if baseline else {})
    options: dict[str, Any] = {"none": none, "query": query, "characters": characters, "lr": lr,
                               "progress": progress, "device": pick_device()}
    options |= {"ks": ks} if ks else {}
    options |= {"steps": steps} if steps else {}
    if open_data(Path(data)).metrics:  # exact metrics of generated replies (a scene world); else the text track
        options |= {"generate_ks": generate_ks} if generate_ks is not None else {}
        options |= {"generate_steps": generate_steps} if generate_steps is not None else {}
        result = evaluation.evaluate_adaptation(runs, Path(data), **options)
    else:
        result = evaluation.evaluate_shakespeare(runs, Path(data), **options)
    json_path, png_path = evaluation.save_adaptation(result, Path(out or Path(run) / "eval"))
    print(f"adaptation on the held-out characters of {data}:\n{evaluation.format_adaptation_table(result)}\n"
          f"saved: {json_path}, {png_path}")
    return result


def shakespeare_build(out: Path, *, min_speeches: int = 50, heldout: int = 8, examples: int = 10,
                      seed: int = 0) -> dict[str, int]:
    """`personae shakespeare build`: write the Shakespeare role-play set (text only); print the counts."""
    from personae.data.shakespeare import build_shakespeare

    counts = build_shakespeare(Path(out), min_speeches=min_speeches, heldout=heldout, examples=examples, seed=seed)
    print(f"Shakespeare set in {out}: {counts['characters']} speakers ({counts['heldout']} held out), "
          f"{counts['conversations']} exchanges")
    return counts


def data_convert(source: Path, fmt: str, out: Path, *, to: str = "personae", card: Path | None = None) -> ConvertReport:
    """`personae data convert`: convert, then print the rows kept and refused (and why)."""
    report = convert(source, fmt, out, to=to, card=load_card(card) if card else None)
    print(report.summary())
    return report


def export(run: Path, out: Path, *, character: str | None = None, merge: bool = False) -> Path:
    """`personae export`: RUN's Hugging Face LM to OUT, merged with the adapter or as a PEFT adapter folder."""
    written = export_run(run, out, character=character, merge=merge)
    kind = "Hugging Face model folder (adapter merged)" if merge else "PEFT adapter folder"
    print(f"wrote a {kind} to {written}")
    return written
