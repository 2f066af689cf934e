"""Reptile (Nichol et al. 2018): move the initialisation towards the mean of the task-adapted weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from personae.config import MetaCfg
from personae.meta.maml import (
    LossFn,
    MetaLearner,
    Params,
    adapt_task,
    adapt_tasks,
    math_attention,
    prepare_tasks,
    task_losses,
)
from personae.meta.tasks import Task, TaskBatch


def reptile_direction(params: Params, adapted_mean: Params) -> Params:
    """theta - mean_i(theta'_i) per adapted name: a gradient, so that SGD with rate eps does Reptile's step."""
    return {name: params[name].detach() - mean.detach() for name, mean in adapted_mean.items()}


def surrogate_loss(params: Params, direction: Params, value: torch.Tensor) -> torch.Tensor:
    """A scalar equal to `value` whose gradient w.r.t. params[name] is direction[name] (zero elsewhere)."""
    surrogate = sum((params[name] * step).sum() for name, step in direction.items())
    return surrogate - surrogate.detach() + value.detach()


class Reptile(MetaLearner):
    """Reptile: adapt each task without a graph; the outer gradient is theta - mean_i(theta'_i).

    With plain SGD at rate eps the outer step is exactly theta + eps * (mean_i(theta'_i) - theta);
    with Adam it is the usual "Reptile direction as a gradient". `meta_loss` returns the mean query
    loss after adaptation (for logging) carrying that gradient.
    """

    algo = "reptile"
    forced_first_order = True

    def __init__(self, module: nn.Module, cfg: MetaCfg | None = None, loss_fn: LossFn | None = None, *,
                 head: Sequence[str] = ("decoder.ln_f",), pad_values: Mapping[str, float] | None = None) -> None:
        if cfg is not None and cfg.learn_inner_lr:
            raise ValueError("meta.learn_inner_lr needs a gradient through the inner loop; reptile has none "
                             "(use maml, fomaml or lora-maml for Meta-SGD)")
        super().__init__(module, cfg, loss_fn, head=head, pad_values=pad_values)

    def adapted_mean(self, tasks: Sequence[Task] | TaskBatch) -> tuple[Params, torch.Tensor]:
        """mean_i(theta'_i) over the tasks' adapted weights, and the mean query loss after adaptation."""
        params, steps, lr = self.params(), self.cfg.inner_steps, self.inner_lr()
        prepared = prepare_tasks(tasks, self.cfg.vmap, self.pad_values)
        if isinstance(prepared, TaskBatch):
            adapted = adapt_tasks(params, self.loss_fn, prepared.support, num_tasks=prepared.num_tasks,
                                  steps=steps, lr=lr, first_order=True, create_graph=False, names=self.names,
                                  randomness=self.cfg.randomness, optimizer=self.cfg.inner_optimizer)
            with torch.no_grad(), math_attention(True):
                query = task_losses(self.loss_fn, adapted, self.names, prepared.query, self.cfg.randomness)
            return {name: adapted[name].mean(0) for name in self.names}, query.mean()
        total: Params = {name: torch.zeros_like(params[name]) for name in self.names}
        losses = []
        for support, query_batch in prepared:
            adapted = adapt_task(params, self.loss_fn, support, steps=steps, lr=lr, first_order=True,
                            create_graph=False, names=self.names, optimizer=self.cfg.inner_optimizer)
            for name in self.names:
                total[name] += adapted[name]
            with torch.no_grad():
                losses.append(self.loss_fn(adapted, query_batch))
        return {name: value / len(prepared) for name, value in total.items()}, torch.stack(losses).mean()

    def meta_loss(self, tasks: Sequence[Task] | TaskBatch) -> torch.Tensor:
        """The mean query loss after adaptation, whose gradient is theta - mean_i(theta'_i)."""
        if (tasks.num_tasks if isinstance(tasks, TaskBatch) else len(tasks)) == 0:
            raise ValueError("the meta-batch has no task")
        params = self.params()
        mean, query = self.adapted_mean(tasks)
        return surrogate_loss(params, reptile_direction(params, mean), query)
