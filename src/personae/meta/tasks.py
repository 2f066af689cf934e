"""Meta-batches of tasks: (support, query) batch pairs, and stacking them along a task dimension for vmap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Batch = Mapping[str, torch.Tensor]
Task = tuple[Batch, Batch]


class StackError(ValueError):
    """Tasks cannot be stacked into one tensor per key; the message names the key and the shapes."""


@dataclass
class TaskBatch:
    """A meta-batch stacked along a leading task dimension: every tensor is (n_tasks, ...)."""

    support: dict[str, torch.Tensor]
    query: dict[str, torch.Tensor]

    @property
    def num_tasks(self) -> int:
        return len(next(iter(self.support.values())))

    def task(self, i: int) -> Task:
        """The i-th task as a (support, query) pair of ordinary batches (views, no copy)."""
        return ({k: v[i] for k, v in self.support.items()}, {k: v[i] for k, v in self.query.items()})

    def tasks(self) -> list[Task]:
        return [self.task(i) for i in range(self.num_tasks)]


def _pad_to(tensor: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape), reversed(shape)):
        pad += [0, want - have]  # F.pad lists the last dimension first, right padding only
    return F.pad(tensor, pad, value=value)


def _stack_key(key: str, tensors: list[torch.Tensor], pad_values: Mapping[str, float], role: str) -> torch.Tensor:
    shapes = [tuple(t.shape) for t in tensors]
    if len({len(s) for s in shapes}) > 1 or len({s[:1] for s in shapes}) > 1:
        raise StackError(f"{role} key {key!r}: tasks have shapes {sorted(set(shapes))}; the number of dimensions "
                         "and of examples (dimension 0) must agree to stack them")
    if len(set(shapes)) == 1:
        return torch.stack(tensors)
    if key not in pad_values:
        raise StackError(f"{role} key {key!r}: tasks have shapes {sorted(set(shapes))} and no pad value is given "
                         f"for {key!r} (pad_values has {sorted(pad_values)})")
    target = [max(s[d] for s in shapes) for d in range(len(shapes[0]))]
    return torch.stack([_pad_to(t, target, pad_values[key]) for t in tensors])


def _stack_role(batches: list[Batch], pad_values: Mapping[str, float], role: str) -> dict[str, torch.Tensor]:
    keys = list(batches[0])
    for i, batch in enumerate(batches[1:], start=1):
        if set(batch) != set(keys):
            raise StackError(f"{role} batches of task 0 and task {i} have different keys: "
                             f"{sorted(keys)} vs {sorted(batch)}")
    for key in keys:
        if not torch.is_tensor(batches[0][key]):
            raise StackError(f"{role} key {key!r} is a {type(batches[0][key]).__name__}, not a tensor")
    return {key: _stack_key(key, [b[key] for b in batches], pad_values, role) for key in keys}


def stack_tasks(tasks: Sequence[Task], pad_values: Mapping[str, float] | None = None) -> TaskBatch:
    """Stack tasks into a TaskBatch, right-padding the keys of `pad_values` to the longest task.

    Padding must leave each task's loss unchanged (for a causal LM: pad ids at the end, labels
    ignored); it is never applied to dimension 0 (the examples of a task), which must agree.
    """
    if not tasks:
        raise StackError("no tasks to stack: the meta-batch is empty")
    pad_values = pad_values or {}
    support = _stack_role([t[0] for t in tasks], pad_values, "support")
    query = _stack_role([t[1] for t in tasks], pad_values, "query")
    return TaskBatch(support, query)


def as_task_list(tasks: Sequence[Task] | TaskBatch) -> list[Task]:
    """The tasks of a meta-batch as (support, query) pairs, whichever form they came in."""
    return tasks.tasks() if isinstance(tasks, TaskBatch) else list(tasks)
