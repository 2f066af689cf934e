"""The ablation table: `personae ablate` trains variants at equal compute over several seeds.

Two groups of variants, every one trained with the same budget (`personae.app.budgets.ABLATION_BUDGETS`):

* **pretraining** -- what multimodal pretraining and its parts buy role-play: the full recipe
  (ITC + ITM + MLM, cross-modal fusion), no pretraining at all (role-play fine-tuning from random
  weights, the same fine-tuning budget), each objective removed in turn (its weight set to 0), and
  single-stream fusion instead of cross-modal attention. Each is pretrained, then fine-tuned.
* **adaptation** -- what meta-learning buys a new character: starting from the same seed's
  fine-tuned `full` run, MAML (second order), first-order MAML, Reptile, LoRA-MAML and ordinary
  multi-task fine-tuning, all with the same outer steps over the same number of conversations.

Every row is evaluated the same way: retrieval R@1 (pretrained rows), the exact role-play metrics
on seen characters' test scenes, and persona consistency on the held-out characters after each
run adapts its own way (k = 5 examples, 10 inner steps). A row is one folder
`OUT/<variant>/seed<N>/` with `row.json`; finished rows are skipped when the command runs again.
The table (`ablation.json`, `ablation.md`, and a section of `personae report OUT`) gives each
column's mean and standard deviation over the seeds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from personae.app.budgets import AblationBudget, ablation_budget
from personae.errors import PersonaeError


@dataclass(frozen=True)
class Variant:
    """One row of the table: its group, what it changes, and how it trains."""

    name: str
    group: str  # pretraining | adaptation
    description: str
    overrides: tuple[str, ...] = ()
    pretrain: bool = True  # pretraining group: False starts fine-tuning from random weights
    algo: str | None = None  # adaptation group: the meta-learning algorithm, None for multi-task fine-tuning


VARIANTS = (
    Variant("full", "pretraining", "ITC + ITM + MLM pretraining, cross-modal fusion (the default recipe)"),
    Variant("no-pretraining", "pretraining", "role-play fine-tuning from random weights", pretrain=False),
    Variant("no-itc", "pretraining", "pretraining without the contrastive loss", ("pretrain.itc_weight=0",)),
    Variant("no-itm", "pretraining", "pretraining without image-text matching", ("pretrain.itm_weight=0",)),
    Variant("no-mlm", "pretraining", "pretraining without masked language modelling", ("pretrain.mlm_weight=0",)),
    Variant("single-stream", "pretraining", "single-stream fusion X=[V;W] instead of cross-modal attention",
            ("model.fusion.kind=single",)),
    Variant("maml", "adaptation", "MAML, second order, every parameter adapts",
            ("meta.first_order=false", "meta.learn_inner_lr=false"), algo="maml"),
    Variant("fomaml", "adaptation", "first-order MAML, every parameter adapts",
            ("meta.first_order=true", "meta.learn_inner_lr=false"), algo="fomaml"),
    Variant("reptile", "adaptation", "Reptile, every parameter adapts", ("meta.learn_inner_lr=false",),
            algo="reptile"),
    Variant("lora-maml", "adaptation", "LoRA-MAML, first order, only rank-4 adapters adapt",
            ("meta.first_order=true", "meta.learn_inner_lr=false"), algo="lora-maml"),
    Variant("multitask", "adaptation", "ordinary multi-task fine-tuning, same budget; fresh LoRA adapters adapt"),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
COLUMNS = {  # key -> (heading, digits)
    "retrieval_r1": ("retrieval R@1", 3),
    "response_accuracy": ("response accuracy", 3),
    "image_text_relevance": ("image-text relevance", 3),
    "persona_seen": ("persona (seen)", 3),
    "persona_heldout_adapted": ("persona (held-out, adapted)", 3),
    "query_loss_adapted": ("held-out query loss (adapted)", 2),
    "fluency_perplexity": ("fluency (perplexity)", 2),
    "train_seconds": ("training time (s)", 0),
}


def select_variants(names: Sequence[str] | None) -> list[Variant]:
    """The variants called NAMES (all when None); an unknown name is an error listing the valid ones."""
    if not names:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise PersonaeError(f"unknown ablation variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANT_NAMES)}")
    chosen = [v for v in VARIANTS if v.name in names]
    if any(v.group == "adaptation" for v in chosen) and "full" not in names:
        chosen.insert(0, VARIANTS[0])  # adaptation rows start from the full recipe's fine-tuned run
    return chosen


@dataclass(frozen=True)
class RowJob:
    """Everything one worker needs to train and evaluate one (variant, seed) row."""

    variant: Variant
    seed: int
    budget: AblationBudget
    world: Path
    out: Path
    overrides: tuple[str, ...]
    threads: int

    @property
    def folder(self) -> Path:
        return self.out / self.variant.name / f"seed{self.seed}"


def _seeded(seed: int) -> list[str]:
    return [f"train.seed={seed}", f"finetune.train.seed={seed}", f"meta.train.seed={seed}"]


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    tick = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - tick


def _train_pretraining_row(job: RowJob, overrides: list[str]) -> tuple[Path, Path | None, float]:
    """Pretrain (or only initialise) then fine-tune; the fine-tuned run, the pretrained one, and the seconds."""
    from personae.config import apply_overrides, load_preset
    from personae.train.finetune import run_config, run_finetune
    from personae.train.pretrain import run_pretrain

    pre, fine = job.folder / "pretrain", job.folder / "roleplay"
    cfg = apply_overrides(load_preset("tiny"), overrides + ([] if job.variant.pretrain else ["train.steps=0"]))
    seconds = _timed(run_pretrain, job.world, pre, cfg, resume=True, progress=False)
    seconds = seconds if job.variant.pretrain else 0.0
    seconds += _timed(run_finetune, pre, job.world, fine, apply_overrides(run_config(pre), overrides), resume=True,
                      progress=False)
    return fine, pre if job.variant.pretrain else None, seconds


def _train_adaptation_row(job: RowJob, overrides: list[str]) -> tuple[Path, float]:
    """Meta-train (or multi-task fine-tune) the seed's full fine-tuned run; the run and the seconds."""
    from personae.config import apply_overrides
    from personae.train.finetune import run_config, run_finetune
    from personae.train.meta import multitask_config, run_meta_train

    start = job.out / "full" / f"seed{job.seed}" / "roleplay"
    if not (start / "model.safetensors").is_file():
        raise PersonaeError(f"{start} is missing: the adaptation rows start from the full recipe's fine-tuned run")
    run = job.folder / "run"
    cfg = apply_overrides(run_config(start), overrides)
    if job.variant.algo is None:
        seconds = _timed(run_finetune, start, job.world, run, multitask_config(cfg), resume=True, progress=False)
    else:
        cfg = apply_overrides(cfg, [f"meta.algo={job.variant.algo}"])
        seconds = _timed(run_meta_train, start, job.world, run, cfg, resume=True, progress=False)
    return run, seconds


def _evaluate_row(run: Path, pretrained: Path | None, job: RowJob) -> dict[str, Any]:
    from personae.data.kinds import open_data
    from personae.data.manifest import read_pairs
    from personae.eval.adaptation import evaluate_adapted
    from personae.eval.retrieval import evaluate_retrieval
    from personae.eval.roleplay import evaluate_roleplay
    from personae.models.io import load_model

    row: dict[str, Any] = {"retrieval_r1": None}
    if pretrained is not None:
        model, _, tokenizer = load_model(pretrained)
        retrieval = evaluate_retrieval(model, tokenizer, read_pairs(job.world / "pairs.jsonl").filter("test"),
                                       progress=False)
        row["retrieval_r1"] = (retrieval["i2t_r@1"] + retrieval["t2i_r@1"]) / 2
    model, cfg, tokenizer = load_model(run)
    roleplay = evaluate_roleplay(model, tokenizer, job.world, split="test", limit=job.budget.roleplay_limit,
                                 max_new_tokens=cfg.finetune.max_new_tokens,
                                 include_examples=cfg.finetune.include_examples,
                                 max_repeats=cfg.finetune.max_repeats, progress=False)
    seen = roleplay["metrics"]["train"]["overall"]
    row |= {"response_accuracy": seen["response_accuracy"], "image_text_relevance": seen["image_text_relevance"],
            "persona_seen": seen["persona_consistency"],
            "fluency_perplexity": roleplay["fluency_perplexity"]["train"]}
    budget = job.budget
    heldout = open_data(job.world).characters("heldout")[: budget.adapt_characters]
    adapted = evaluate_adapted(run, job.world, k=budget.adapt_k, steps=budget.adapt_steps, query=budget.adapt_query,
                               seed=job.seed, characters=heldout)
    row |= {"persona_heldout_adapted": adapted["metrics"]["persona_consistency"],
            "query_loss_adapted": adapted["query_loss_after"], "adapted_with": adapted["inner_params"]}
    return row


def run_row(job: RowJob) -> dict[str, Any]:
    """Train and evaluate one (variant, seed) row, or read it back when `row.json` exists."""
    path = job.folder / "row.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    torch.set_num_threads(job.threads)
    overrides = job.budget.overrides() + _seeded(job.seed) + list(job.variant.overrides) + list(job.overrides)
    if job.variant.group == "pretraining":
        run, pretrained, seconds = _train_pretraining_row(job, overrides)
    else:
        (run, seconds), pretrained = _train_adaptation_row(job, overrides), None
    row = {"variant": job.variant.name, "group": job.variant.group, "seed": job.seed,
           "train_seconds": round(seconds, 1), "threads": job.threads} | _evaluate_row(run, pretrained, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _run_jobs(jobs: list[RowJob], workers: int, progress: bool) -> list[dict[str, Any]]:
    """Rows in order; several at once in spawned processes when `workers` > 1."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="ablation rows", unit="row", disable=not progress)
    rows = []
    if workers <= 1:
        for job in jobs:
            bar.set_postfix(row=f"{job.variant.name}/seed{job.seed}")
            rows.append(run_row(job))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for row in pool.map(run_row, jobs):
                rows.append(row)
                bar.update(1)
    bar.close()
    return rows


def _stats(values: list[float]) -> dict[str, float | int]:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0  # sample standard deviation over seeds
    return {"mean": statistics.fmean(values), "std": spread, "n": len(values)}


def summarise(rows: list[dict[str, Any]], variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """One entry per variant: each column's mean, standard deviation (over seeds) and count."""
    table = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant.name]
        if not mine:
            continue
        entry: dict[str, Any] = {"variant": variant.name, "group": variant.group, "description": variant.description,
                                 "seeds": sorted(r["seed"] for r in mine)}
        for key in COLUMNS:
            values = [r[key] for r in mine if r.get(key) is not None and math.isfinite(r[key])]
            entry[key] = _stats(values) if values else None
        table.append(entry)
    return table


def format_cell(stats: dict[str, Any] | None, digits: int) -> str:
    """'0.245 ± 0.012' (mean ± standard deviation over seeds), or '-' where the column does not apply."""
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The table in Markdown, one row per variant, grouped."""
    header = "| group | variant | " + " | ".join(h for h, _ in COLUMNS.values()) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for entry in table:
        cells = [format_cell(entry[key], digits) for key, (_, digits) in COLUMNS.items()]
        lines.append(f"| {entry['group']} | {entry['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(out: Path, table: list[dict[str, Any]], rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """OUT/ablation.json (the table, every row, the settings) and OUT/ablation.md."""
    (out / "ablation.json").write_text(json.dumps({**meta, "columns": {k: h for k, (h, _) in COLUMNS.items()},
                                                   "table": table, "rows": rows}, indent=2) + "\n")
    budget = meta["budget"]
    notes = (f"Budget `{budget['name']}`, seeds {meta['seeds']}; mean ± standard deviation over seeds. "
             f"Held-out persona: after adapting to each held-out character from k = {budget['adapt_k']} examples, "
             f"{budget['adapt_steps']} inner steps, each run its own way.\n")
    (out / "ablation.md").write_text(f"# Ablation\n\n{notes}\n{markdown_table(table)}\n")


def run_ablation(out: Path, *, budget: AblationBudget | str = "quick", seeds: int | None = None,
                 variants: Sequence[str] | None = None, data: Path | None = None, jobs: int = 1,
                 overrides: Sequence[str] = (), progress: bool = True) -> list[dict[str, Any]]:
    """Train and evaluate every (variant, seed) row; write the table; return it."""
    budget = ablation_budget(budget) if isinstance(budget, str) else budget
    out, chosen = Path(out), select_variants(variants)
    seed_list = list(range(seeds if seeds is not None else budget.seeds))
    if not seed_list:
        raise PersonaeError("the ablation needs at least one seed")
    world = Path(data) if data is not None else out / "world"
    from personae.world import WORLD_FILE, SceneWorld, build_world

    if not SceneWorld.marks(world):
        if data is not None:
            raise PersonaeError(f"{world} is not a scene world (no {WORLD_FILE}): "
                                "build one with `personae world build`")
        build_world(world, seed=0, scenes=budget.scenes, progress=progress)
    workers = max(1, jobs)
    if workers == 1:  # rows run in this process, with its threads
        import torch

        threads = torch.get_num_threads()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
    tick = time.perf_counter()
    rows = []
    for group in ("pretraining", "adaptation"):  # adaptation rows start from the pretraining group's full runs
        batch = [RowJob(v, s, budget, world, out, tuple(overrides), threads)
                 for v in chosen if v.group == group for s in seed_list]
        rows += _run_jobs(batch, workers, progress)
    table = summarise(rows, chosen)
    meta = {"budget": asdict(budget), "seeds": seed_list, "variants": [v.name for v in chosen],
            "overrides": list(overrides), "world": str(world), "jobs": workers, "threads_per_job": threads,
            "seconds": round(time.perf_counter() - tick, 1)}
    write_table(out, table, rows, meta)
    print(f"ablation ({budget.name}, seeds {seed_list}):\n{markdown_table(table)}\n"
          f"saved: {out / 'ablation.json'}, {out / 'ablation.md'}")
    return table
