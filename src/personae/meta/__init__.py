"""Gradient-based meta-learning over tasks (MAML, FOMAML, Reptile, ANIL, LoRA-MAML) on torch.func."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from personae.config import MetaCfg
from personae.meta.maml import (
    ANIL,
    FOMAML,
    MAML,
    LoRAMAML,
    LossFn,
    MetaLearner,
    Params,
    adapt_task,
    adapt_tasks,
    inner_loop,
    inner_trajectory,
    meta_loss,
    module_loss,
    select_names,
    task_query_losses,
)
from personae.meta.reptile import Reptile, reptile_direction
from personae.meta.tasks import StackError, Task, TaskBatch, stack_tasks

META: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
    "anil": ANIL,
    "lora-maml": LoRAMAML,
}


def build_meta(module: nn.Module, cfg: MetaCfg, loss_fn: LossFn | None = None, *,
               head: Sequence[str] = ("decoder.ln_f",), pad_values: Mapping[str, float] | None = None) -> MetaLearner:
    """The learner META[cfg.algo] around `module`."""
    if cfg.algo not in META:
        raise ValueError(f"unknown meta.algo {cfg.algo!r}; choose one of {', '.join(META)}")
    return META[cfg.algo](module, cfg, loss_fn, head=head, pad_values=pad_values)


__all__ = [
    "ANIL", "FOMAML", "MAML", "META", "LoRAMAML", "LossFn", "MetaCfg", "MetaLearner", "Params", "Reptile",
    "StackError", "Task", "TaskBatch", "adapt_task", "adapt_tasks", "build_meta", "inner_loop", "inner_trajectory",
    "meta_loss", "module_loss", "reptile_direction", "select_names", "stack_tasks", "task_query_losses",
]
