"""Named compute budgets for the main job (`personae demo`) and the ablation (`personae ablate`).

A budget fixes how much every stage trains and how much every evaluation looks at, so that a run
on 2 CPU cores has a known wall time. `quick` is what `make demo` runs (about 13 minutes on 2
cores); `full` is the tiny preset's own training lengths (about 28 minutes on 2 cores). Overrides given on
the command line still win: the budget's settings come first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from personae.errors import PersonaeError


@dataclass(frozen=True)
class Budget:
    """Training lengths and evaluation sizes of one demo or ablation run."""

    name: str
    scenes: int  # the scene world's size
    pretrain_steps: int
    finetune_steps: int
    meta_steps: int  # meta-batches; the multi-task baseline gets the same number of steps and conversations
    roleplay_limit: int  # test conversations per character split in the role-play evaluation
    adapt_ks: tuple[int, ...] = (1, 5)
    adapt_steps: tuple[int, ...] = (0, 1, 2, 5, 10)
    adapt_query: int = 6  # query conversations per held-out character
    extra: tuple[str, ...] = field(default_factory=tuple)  # further config overrides

    def overrides(self) -> list[str]:
        """The budget as dotted config overrides (for `apply_overrides` and the stages)."""
        return [f"train.steps={self.pretrain_steps}", f"finetune.train.steps={self.finetune_steps}",
                f"meta.train.steps={self.meta_steps}", *self.extra]


DEMO_BUDGETS = {
    "quick": Budget("quick", scenes=10000, pretrain_steps=250, finetune_steps=900, meta_steps=60,
                    roleplay_limit=120),
    "full": Budget("full", scenes=10000, pretrain_steps=500, finetune_steps=1500, meta_steps=240,
                   roleplay_limit=200, adapt_ks=(1, 5, 10), adapt_steps=(0, 1, 2, 5, 10, 20), adapt_query=12),
}


def demo_budget(name: str) -> Budget:
    """The demo budget called NAME, or an error listing the valid names."""
    if name not in DEMO_BUDGETS:
        raise PersonaeError(f"unknown budget {name!r}; choose one of {', '.join(DEMO_BUDGETS)}")
    return DEMO_BUDGETS[name]


@dataclass(frozen=True)
class AblationBudget:
    """Per-variant training lengths and evaluation sizes of `personae ablate` (every variant gets the same)."""

    name: str
    scenes: int
    pretrain_steps: int
    pretrain_batch: int
    finetune_steps: int
    finetune_batch: int
    meta_steps: int
    meta_batch: int  # tasks per meta-step; each task has `support` + `query` conversations
    support: int
    query: int
    inner_steps: int
    roleplay_limit: int  # test conversations per character split
    adapt_query: int  # query conversations per held-out character
    seeds: int = 3
    adapt_k: int = 5  # support conversations of each held-out character
    adapt_steps: int = 10  # inner steps of the held-out adaptation
    adapt_characters: int | None = None  # the first N held-out characters (None: all)

    def overrides(self) -> list[str]:
        """The budget as dotted config overrides."""
        return [f"train.steps={self.pretrain_steps}", f"train.batch_size={self.pretrain_batch}",
                f"train.save_every={max(1, self.pretrain_steps)}", f"finetune.train.steps={self.finetune_steps}",
                f"finetune.train.batch_size={self.finetune_batch}",
                f"finetune.train.save_every={max(1, self.finetune_steps)}", f"meta.train.steps={self.meta_steps}",
                f"meta.train.save_every={max(1, self.meta_steps)}", f"meta.meta_batch={self.meta_batch}",
                f"meta.support={self.support}", f"meta.query={self.query}", f"meta.inner_steps={self.inner_steps}"]


ABLATION_BUDGETS = {
    "quick": AblationBudget("quick", scenes=3000, pretrain_steps=60, pretrain_batch=32, finetune_steps=80,
                            finetune_batch=16, meta_steps=10, meta_batch=2, support=5, query=5, inner_steps=1,
                            roleplay_limit=30, adapt_query=3),
    "full": AblationBudget("full", scenes=10000, pretrain_steps=150, pretrain_batch=64, finetune_steps=200,
                           finetune_batch=32, meta_steps=30, meta_batch=4, support=5, query=5, inner_steps=1,
                           roleplay_limit=60, adapt_query=4),
}


def ablation_budget(name: str) -> AblationBudget:
    """The ablation budget called NAME, or an error listing the valid names."""
    if name not in ABLATION_BUDGETS:
        raise PersonaeError(f"unknown budget {name!r}; choose one of {', '.join(ABLATION_BUDGETS)}")
    return ABLATION_BUDGETS[name]


__all__ = ["ABLATION_BUDGETS", "DEMO_BUDGETS", "AblationBudget", "Budget", "ablation_budget", "demo_budget"]
