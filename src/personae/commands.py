"""What each `personae` command does once its arguments are parsed (cli.py only parses)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personae.data.manifest import read_pairs
from personae.eval.retrieval import evaluate_retrieval, format_table, save_result
from personae.eval.roleplay import evaluate_roleplay, format_roleplay_table
from personae.models.sampling import SamplingParams
from personae.models.io import load_model
from personae.train.distributed import pick_device


def evaluate_run(run: Path, data: Path, *, split: str = "test", out: Path | None = None, batch_size: int = 128,
                 progress: bool = True) -> dict[str, float]:
    """`personae eval retrieval`: load RUN, score the split, print the table, save JSON."""
    model, _, tokenizer = load_model(run, pick_device())
    manifest = read_pairs(Path(data) / "pairs.jsonl").filter(split)
    result = evaluate_retrieval(model, tokenizer, manifest, batch_size=batch_size, progress=progress)
    path = save_result(result, out or Path(run) / "eval" / "retrieval.json")
    print(f"retrieval on the {split} split of {data}:\n{format_table(result)}\nsaved: {path}")
    return result


def evaluate_roleplay_run(run: Path, data: Path, *, split: str = "test", out: Path | None = None,
                          limit: int | None = None, batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """`personae eval roleplay`: generate and score every reply of the split, print and save."""
    model, cfg, tokenizer = load_model(run, pick_device())
    result = evaluate_roleplay(model, tokenizer, Path(data), split=split, limit=limit, batch_size=batch_size,
                               max_new_tokens=cfg.finetune.max_new_tokens,
                               include_examples=cfg.finetune.include_examples, progress=progress)
    path = Path(out or Path(run) / "eval" / "roleplay.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"role-play on the {split} split of {data}:\n{format_roleplay_table(result)}\nsaved: {path}")
    return result


def chat(run: Path, character: str, *, image: Path | None = None, temperature: float = 0.0, top_p: float = 1.0,
         max_tokens: int = 64, seed: int | None = None, user: str = "User") -> None:
    """`personae chat`: an interactive terminal chat that streams the replies."""
    from personae.chat.session import ChatSession, find_character, run_terminal_chat

    model, cfg, tokenizer = load_model(run, pick_device())
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    session = ChatSession(model, tokenizer, find_character(run, character), params=params, user=user,
                          include_examples=cfg.finetune.include_examples)
    if image is not None:
        session.set_image(image)
    run_terminal_chat(session)
