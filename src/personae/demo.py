"""The main job on the built-in data: build the world, pretrain, evaluate; stages already done are skipped."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from personae.commands import evaluate_run
from personae.config import apply_overrides, load_preset
from personae.train.stages import run_pretrain


def _stage(name: str, done: bool, timings: dict[str, float]) -> bool:
    """Print the stage banner; return True when the stage must run."""
    if done:
        print(f"== {name}: already done, skipped (use --fresh to redo)")
        timings[name] = 0.0
        return False
    print(f"== {name}")
    return True


def run_demo(out: Path, *, scenes: int = 10000, steps: int | None = None, fresh: bool = False,
             overrides: list[str] | None = None, progress: bool = True) -> dict[str, float]:
    """Build the scene world, pretrain the tiny preset on it and evaluate retrieval on the test split."""
    from personae.data.world import build_world

    out = Path(out)
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    world, run = out / "world", out / "pretrain"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if _stage("build the scene world", (world / "pairs.jsonl").exists(), timings):
        build_world(world, seed=0, scenes=scenes, progress=progress)
        timings["world"] = time.perf_counter() - start
    cfg = apply_overrides(load_preset("tiny"), (overrides or []) + ([f"train.steps={steps}"] if steps else []))
    tick = time.perf_counter()
    if _stage("pretrain (ITC + ITM + MLM)", (run / "model.safetensors").exists(), timings):
        run_pretrain(world, run, cfg, resume=True, progress=progress)
        timings["pretrain"] = time.perf_counter() - tick
    tick = time.perf_counter()
    print("== evaluate retrieval")
    result = evaluate_run(run, world, progress=progress)
    timings["eval"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - start
    (out / "demo.json").write_text(json.dumps({"retrieval": result, "seconds": timings}, indent=2) + "\n")
    print(f"\nwall time: {timings['total']:.0f} s.  results: {out / 'demo.json'}  run: {run}")
    print(f"next: personae eval retrieval {run} --data {world}")
    return result
