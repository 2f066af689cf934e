"""The main job on the built-in data: world -> pretrain -> retrieval eval -> fine-tune -> role-play eval.

Each stage writes its output under OUT and is skipped when that output already exists (unless
--fresh), so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personae.commands import evaluate_roleplay_run, evaluate_run
from personae.config import apply_overrides, load_preset
from personae.eval.report import environment_info, write_report


@dataclass
class Stage:
    """One step of the demo: its name, the file that proves it is done, and how to run it."""

    name: str
    output: Path
    run: Callable[[], Any]


def _run_stages(stages: list[Stage], timings: dict[str, float]) -> dict[str, Any]:
    results = {}
    for number, stage in enumerate(stages, 1):
        banner = f"[{number}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            print(f"{banner}: already done, skipped (use --fresh to redo)")
            if stage.output.suffix == ".json":
                results[stage.name] = json.loads(stage.output.read_text())
            continue
        print(f"{banner} ...", flush=True)
        tick = time.perf_counter()
        results[stage.name] = stage.run()
        timings[stage.name] = round(time.perf_counter() - tick, 1)
    return results


def run_demo(out: Path, *, scenes: int = 10000, steps: int | None = None, finetune_steps: int | None = None,
             fresh: bool = False, overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Build the scene world, pretrain and fine-tune the tiny preset on it, evaluate both stages."""
    from personae.data.world import build_world
    from personae.train.finetune import run_finetune
    from personae.train.stages import run_pretrain

    out = Path(out)
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    world, pre, fine = out / "world", out / "pretrain", out / "roleplay"
    extra = list(overrides or [])
    extra += [f"train.steps={steps}"] if steps else []
    extra += [f"finetune.train.steps={finetune_steps}"] if finetune_steps else []
    cfg = apply_overrides(load_preset("tiny"), extra)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    stages = [
        Stage("build the scene world", world / "world.json",
              lambda: build_world(world, seed=0, scenes=scenes, progress=progress)),
        Stage("pretrain (ITC + ITM + MLM)", pre / "model.safetensors",
              lambda: run_pretrain(world, pre, cfg, resume=True, progress=progress)),
        Stage("evaluate retrieval", pre / "eval" / "retrieval.json",
              lambda: evaluate_run(pre, world, progress=progress)),
        Stage("fine-tune role-play", fine / "model.safetensors",
              lambda: run_finetune(pre, world, fine, overrides=extra, resume=True, progress=progress)),
        Stage("evaluate role-play", fine / "eval" / "roleplay.json",
              lambda: evaluate_roleplay_run(fine, world, limit=200, progress=progress)),
    ]
    results = _run_stages(stages, timings)
    timings["total"] = round(time.perf_counter() - start, 1)
    summary = {"seconds": timings, "retrieval": results.get("evaluate retrieval"),
               "roleplay": _roleplay_summary(results.get("evaluate role-play")),
               "environment": environment_info()}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_report(out)
    _print_summary(out, world, fine, summary)
    print(f"report: {report}")
    return summary


def _roleplay_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not result:
        return None
    return {split: block["overall"] for split, block in result["metrics"].items()} | {
        "fluency_perplexity": result["fluency_perplexity"], "samples": result["samples"][:6]}


def _print_summary(out: Path, world: Path, fine: Path, summary: dict[str, Any]) -> None:
    retrieval, roleplay = summary["retrieval"] or {}, summary["roleplay"] or {}
    print("\n== summary")
    if retrieval:
        print(f"retrieval (test, {retrieval['pairs']} pairs): image->text R@1 {retrieval['i2t_r@1']:.3f} "
              f"R@5 {retrieval['i2t_r@5']:.3f}; text->image R@1 {retrieval['t2i_r@1']:.3f} "
              f"R@5 {retrieval['t2i_r@5']:.3f} (chance R@1 {retrieval['chance_r@1']:.3f})")
    for split in ("train", "heldout"):
        if split in roleplay:
            row = roleplay[split]
            print(f"role-play, {'seen' if split == 'train' else 'held-out'} characters: "
                  + ", ".join(f"{k.replace('_', ' ')} {row[k]:.3f}" for k in
                              ("response_accuracy", "image_text_relevance", "persona_consistency")
                              if row.get(k) is not None))
    for sample in roleplay.get("samples", [])[:4]:
        print(f"  [{sample['character']}] user: {sample['user']}\n      reply: {sample['reply']}")
    print(f"\nwall time {summary['seconds']['total']:.0f} s; results: {out / 'demo.json'}")
    print(f"next: personae chat {fine} --character captain-saltbeard --image {world}/images/s009500.png")
