"""The main job on the built-in data, end to end: `personae demo`.

world -> pretrain -> retrieval eval -> role-play fine-tune -> role-play eval -> what the image is worth (grounding)
-> meta-train (the preset's algorithm)
-> the same budget of multi-task fine-tuning (the baseline) -> adaptation eval on the held-out
characters -> adapters for every held-out character -> report.html and a summary table.

Each stage writes its output under OUT and is skipped when that output already exists (unless
--fresh), so an interrupted demo picks up where it stopped. How long each stage trains is the
budget's (`personae.app.budgets`); `quick` is what `make demo` runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from personae.app.budgets import Budget, demo_budget
from personae.app.commands import evaluate_adaptation_run, evaluate_grounding_run, evaluate_roleplay_run, evaluate_run
from personae.config import Config, apply_overrides, load_preset
from personae.data.episodes import examples_file
from personae.data.kinds import open_data
from personae.eval.report import environment_info, write_report
from personae.train.adapt import adapt_character
from personae.train.finetune import run_config, run_finetune
from personae.train.meta import multitask_config, run_meta_train
from personae.train.pretrain import run_pretrain
from personae.world import WORLD_FILE, build_world

ADAPT_K, ADAPT_STEPS = 5, 10  # what the held-out characters' adapters and the headline figures use
GROUNDING_LIMIT = 12  # conversations per character split the grounding diagnosis scores (a few seconds)


@dataclass
class Stage:
    """One step of the demo: its name, the file that proves it is done, and how to run it."""

    name: str
    output: Path
    run: Callable[[], Any]


class DemoPaths(NamedTuple):
    """Where each stage of a demo folder writes: ROOT/world, ROOT/pretrain, ... (a field per stage)."""

    root: Path
    world: Path
    pretrain: Path
    roleplay: Path
    meta: Path
    multitask: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        root = Path(root)
        return cls(root, *(root / name for name in cls._fields[1:]))


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


def _run_stages(stages: list[Stage], timings: dict[str, float], start: float) -> dict[str, Any]:
    """Run the stages in order, skipping finished ones; one numbered line per stage with the elapsed time."""
    results = {}
    for number, stage in enumerate(stages, 1):
        banner = f"[{number}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            print(f"{banner}: already done, skipped (use --fresh to redo)")
            if stage.output.suffix == ".json":
                results[stage.name] = json.loads(stage.output.read_text())
            continue
        print(f"{banner} ... (elapsed {_clock(time.perf_counter() - start)})", flush=True)
        tick = time.perf_counter()
        results[stage.name] = stage.run()
        timings[stage.name] = round(time.perf_counter() - tick, 1)
        print(f"{banner}: done in {_clock(timings[stage.name])}", flush=True)
    return results


def demo_config(budget: Budget, overrides: list[str]) -> Config:
    """The tiny preset with the budget's training lengths, then the user's overrides."""
    return apply_overrides(load_preset("tiny"), budget.overrides() + overrides)


def _stages(paths: DemoPaths, budget: Budget, cfg: Config, extra: list[str], progress: bool) -> list[Stage]:
    world, pre, fine, meta, multitask = paths.world, paths.pretrain, paths.roleplay, paths.meta, paths.multitask
    return [
        Stage("build the scene world", world / WORLD_FILE,
              lambda: build_world(world, seed=0, scenes=budget.scenes, progress=progress)),
        Stage("pretrain (ITC + ITM + MLM)", pre / "model.safetensors",
              lambda: run_pretrain(world, pre, cfg, resume=True, progress=progress)),
        Stage("evaluate retrieval", pre / "eval" / "retrieval.json",
              lambda: evaluate_run(pre, world, progress=progress)),
        Stage("fine-tune role-play", fine / "model.safetensors",
              lambda: run_finetune(pre, world, fine, apply_overrides(run_config(pre), extra), resume=True,
                                   progress=progress)),
        Stage("evaluate role-play", fine / "eval" / "roleplay.json",
              lambda: evaluate_roleplay_run(fine, world, limit=budget.roleplay_limit, progress=progress)),
        Stage("what the image is worth (grounding)", fine / "eval" / "grounding.json",
              lambda: evaluate_grounding_run(fine, world, limit=GROUNDING_LIMIT, progress=progress)),
        Stage(f"meta-train ({cfg.meta.algo})", meta / "model.safetensors",
              lambda: run_meta_train(fine, world, meta, apply_overrides(run_config(fine), extra), resume=True,
                                     progress=progress)),
        Stage("multi-task fine-tuning, same budget (baseline)", multitask / "model.safetensors",
              lambda: run_finetune(fine, world, multitask, multitask_config(apply_overrides(run_config(fine), extra)),
                                   resume=True, progress=progress)),
        Stage("evaluate adaptation to held-out characters", meta / "eval" / "adaptation.json",
              lambda: evaluate_adaptation_run(meta, world, baseline=multitask, ks=list(budget.adapt_ks),
                                              steps=list(budget.adapt_steps), generate_ks=[ADAPT_K],
                                              generate_steps=[0, ADAPT_STEPS], query=budget.adapt_query,
                                              progress=progress)),
        Stage("adapt to each held-out character", meta / "eval" / "adapted.json",
              lambda: adapt_heldout(meta, world, progress=progress)),
    ]


def adapt_heldout(run: Path, world: Path, *, k: int = ADAPT_K, steps: int = ADAPT_STEPS,
                  progress: bool = True) -> dict[str, Any]:
    """Write RUN/adapters/<id>.safetensors for every held-out character of WORLD; a summary in RUN/eval."""
    characters = open_data(world).characters("heldout")
    tick = time.perf_counter()
    adapters = {}
    for character in tqdm(characters, desc="adapting", unit="character", disable=not progress):
        path = adapt_character(run, world / "characters" / f"{character}.json",
                               examples_file(world / "characters", character), k=k, steps=steps, progress=False)
        adapters[character] = str(path.relative_to(run))
    summary = {"k": k, "steps": steps, "adapters": adapters,
               "seconds_per_character": round((time.perf_counter() - tick) / max(1, len(characters)), 2)}
    (run / "eval").mkdir(parents=True, exist_ok=True)
    (run / "eval" / "adapted.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_demo(out: Path, *, budget: Budget | str = "quick", scenes: int | None = None, steps: int | None = None,
             finetune_steps: int | None = None, fresh: bool = False, overrides: list[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Every stage of the main job on the built-in world; write OUT/demo.json and OUT/report.html."""
    budget = demo_budget(budget) if isinstance(budget, str) else budget
    paths = DemoPaths.under(out)
    if fresh:
        shutil.rmtree(paths.root, ignore_errors=True)
    extra = list(overrides or [])
    extra += [f"train.steps={steps}"] if steps else []
    extra += [f"finetune.train.steps={finetune_steps}"] if finetune_steps else []
    if scenes:
        budget = dataclasses.replace(budget, scenes=scenes)
    cfg = demo_config(budget, extra)
    extra = budget.overrides() + extra
    timings: dict[str, float] = {}
    start = time.perf_counter()
    print(f"personae demo: budget {budget.name!r} -> {paths.root}", flush=True)
    results = _run_stages(_stages(paths, budget, cfg, extra, progress), timings, start)
    timings["total"] = round(time.perf_counter() - start, 1)
    summary = {"budget": budget.name, "seconds": timings, "retrieval": results.get("evaluate retrieval"),
               "roleplay": _roleplay_summary(results.get("evaluate role-play")),
               "grounding": _grounding_summary(results.get("what the image is worth (grounding)")),
               "adaptation": _adaptation_summary(_read(paths.meta / "eval" / "adaptation.json")),
               "environment": environment_info()}
    (paths.root / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_report(paths.root)
    print_summary(paths, summary)
    print(f"report: {report}")
    return summary


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _roleplay_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    if not result:
        return None
    return {split: block["overall"] for split, block in result["metrics"].items()} | {
        "fluency_perplexity": result["fluency_perplexity"], "samples": _one_per_character(result["samples"])[:6]}


def _grounding_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The loss by token kind (true / shuffled / blank) and the prefix attention over all answer tokens."""
    if not result:
        return None
    return {"loss": result["loss"].get("by_kind") or {"all tokens": result["loss"]["all"]},
            "attention": result["attention"].get("all tokens") or {}}


def _grounding_lines(grounding: dict[str, Any]) -> list[str]:
    lines = ["image worth: reply-token loss in nats (true / shuffled / blank image)"]
    for kind, row in grounding["loss"].items():
        values = " / ".join(_num(row.get(image), 2) for image in ("true", "shuffled", "blank"))
        lines.append(f"  {kind:<30} {values}")
    heads = [mass for layer in grounding["attention"].get("mass") or [] for mass in layer]
    if heads:
        lines.append(f"  {'attention on the image':<30} {_num(sum(heads) / len(heads))} mean, {_num(max(heads))} "
                     f"top head (uniform {_num(grounding['attention'].get('uniform'))})")
    return lines


def _adaptation_summary(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """Query loss and exact metrics of each method at k=5 after 0 and 10 steps; a few adapted replies."""
    if not result:
        return None
    k = str(ADAPT_K)
    rows = {}
    for label, by_k in result["query_loss"].items():
        metrics = result.get("metrics", {}).get(label, {}).get(k, {})
        rows[label] = {"query_loss": by_k.get(k, {}),
                       "persona": {s: m.get("persona_consistency") for s, m in metrics.items()},
                       "accuracy": {s: m.get("response_accuracy") for s, m in metrics.items()}}
    samples = [s for s in result.get("samples", {}).get("meta", []) if s.get("steps") == ADAPT_STEPS]
    return {"k": ADAPT_K, "steps": ADAPT_STEPS, "methods": rows, "samples": samples[:4]}


ROLEPLAY_ROWS = {"response_accuracy": "response accuracy", "image_text_relevance": "image-text relevance",
                 "instruction_adherence": "instruction adherence", "persona_consistency": "persona consistency",
                 "knowledge_consistency": "knowledge consistency"}


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _retrieval_lines(retrieval: dict[str, Any]) -> list[str]:
    return [f"retrieval (test, {retrieval['pairs']} pairs; chance R@1 {retrieval['chance_r@1']:.3f})",
            f"  image->text  R@1 {retrieval['i2t_r@1']:.3f}  R@5 {retrieval['i2t_r@5']:.3f}  "
            f"R@10 {retrieval['i2t_r@10']:.3f}",
            f"  text->image  R@1 {retrieval['t2i_r@1']:.3f}  R@5 {retrieval['t2i_r@5']:.3f}  "
            f"R@10 {retrieval['t2i_r@10']:.3f}"]


def _roleplay_lines(roleplay: dict[str, Any]) -> list[str]:
    seen, held = roleplay.get("train", {}), roleplay.get("heldout", {})
    lines = [f"role-play (test scenes)          {'seen':>8} {'held-out':>9}"]
    lines += [f"  {label:<30} {_num(seen.get(key)):>8} {_num(held.get(key)):>9}" for key, label in ROLEPLAY_ROWS.items()]
    fluency = roleplay.get("fluency_perplexity") or {}
    if isinstance(fluency, dict):
        lines.append(f"  {'fluency (perplexity)':<30} {_num(fluency.get('train'), 2):>8} "
                     f"{_num(fluency.get('heldout'), 2):>9}")
    return lines


def _adaptation_lines(adaptation: dict[str, Any]) -> list[str]:
    k, steps = adaptation["k"], str(adaptation["steps"])
    lines = [f"adaptation to held-out characters (k={k}; before -> after {steps} steps)",
             f"  {'method':<12} {'query loss':>18} {'persona consistency':>22} {'response accuracy':>20}"]
    for label, row in adaptation["methods"].items():
        loss, persona, accuracy = row["query_loss"], row["persona"], row["accuracy"]
        lines.append(f"  {label:<12} {_num(loss.get('0'), 2):>8} -> {_num(loss.get(steps), 2):<7} "
                     f"{_num(persona.get('0')):>11} -> {_num(persona.get(steps)):<7} "
                     f"{_num(accuracy.get('0')):>9} -> {_num(accuracy.get(steps)):<7}")
    return lines


def _one_per_character(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first sample of each character, in order (the summary shows several voices, not one)."""
    seen: set[str] = set()
    return [s for s in samples if not (s["character"] in seen or seen.add(s["character"]))]


def print_summary(paths: DemoPaths, summary: dict[str, Any]) -> None:
    """The end-of-demo table: retrieval, role-play, adaptation, a few replies, and what to try next."""
    lines = [f"\n== summary (budget {summary.get('budget')}, wall time {_clock(summary['seconds']['total'])})"]
    if summary.get("retrieval"):
        lines += _retrieval_lines(summary["retrieval"])
    if summary.get("roleplay"):
        lines += _roleplay_lines(summary["roleplay"])
    if summary.get("grounding"):
        lines += _grounding_lines(summary["grounding"])
    if summary.get("adaptation"):
        lines += _adaptation_lines(summary["adaptation"])
    samples = [("seen", s) for s in _one_per_character((summary.get("roleplay") or {}).get("samples", []))[:3]]
    samples += [("adapted", s) for s in _one_per_character((summary.get("adaptation") or {}).get("samples", []))[:2]]
    if samples:
        lines.append("sample replies")
    for kind, sample in samples:
        lines.append(f"  [{sample['character']}, {kind}] user: {sample['user']}\n      reply: {sample['reply']}")
    print("\n".join(lines))
    print(f"\nresults: {paths.root / 'demo.json'}\nnext:")
    heldout = next(iter(((summary.get("adaptation") or {}).get("samples") or [{}])), {}).get("character")
    images = sorted((paths.world / "images").glob("*.png"))
    image = f" --image {images[-1]}" if images else ""
    print(f"  personae chat {paths.roleplay} --character captain-saltbeard{image}")
    if heldout:
        print(f"  personae chat {paths.meta} --character {heldout}      # a held-out character, adapted from 5 examples")
    print(f"  personae serve {paths.roleplay}                         # OpenAI-compatible API + web page on :8000")
    print(f"  personae report {paths.root}")
