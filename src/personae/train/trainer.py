"""The training loop: AdamW, warm-up + cosine, accumulation, clipping, bf16, logs, exact resume."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from personae.config import Config, ConfigError, TrainCfg
from personae.data.tokenizer import Tokenizer
from personae.models.checkpointing import enable_checkpointing
from personae.models.io import MODEL_FILE, load_tensors, require_file
from personae.models.model import PersonaeModel
from personae.train.checkpoint import (
    TrainerState,
    check_writable,
    finished_state,
    latest_checkpoint,
    load_training_state,
    remove_stale_staging,
    save_checkpoint,
    tensor_bytes,
)
from personae.train.distributed import DistInfo, all_reduce_mean

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2  # step checkpoints kept; the older is removed only after a newer one is complete


def lr_at(step: int, cfg: TrainCfg) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors and scalars (biases, norms, temperature) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class StepBatchSampler:
    """Deterministic batches addressed by micro-step: epoch e is a permutation seeded by (seed, e).

    Every process draws the same global batch of batch_size * world_size indices and keeps its
    own slice, so a resumed run (start > 0) sees exactly the batches it would have seen.

    With `lengths` and `group` > 0, each run of `group` global batches of the permutation is sorted
    by length before it is cut into batches, and those batches are shuffled among themselves: the
    epoch holds the same examples, and a batch pads to a length near its rows' own (less work on
    padding for variable-length conversations).
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1, lengths: Sequence[int] | None = None, group: int = 0) -> None:
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(f"the data set has {size} examples, fewer than one global batch ({self.global_batch})")
        if group and (lengths is None or len(lengths) != size):
            raise ValueError(f"grouping batches by length needs one length per example ({size}), "
                             f"got {None if lengths is None else len(lengths)}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.stop, self.rank = start, stop, rank
        self.per_epoch = size // self.global_batch
        self.lengths = torch.as_tensor(lengths) if group else None
        self.group = group
        self._order_epoch, self._order = -1, torch.empty(0, 0, dtype=torch.long)

    def _epoch_batches(self, epoch: int) -> torch.Tensor:
        """(per_epoch, global_batch) indices of an epoch's global batches, in order."""
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(self.size, generator=generator)[: self.per_epoch * self.global_batch]
        batches = perm.view(self.per_epoch, self.global_batch)
        if not self.group:
            return batches
        grouped = []
        for first in range(0, self.per_epoch, self.group):
            run = batches[first : first + self.group].flatten()
            run = run[torch.argsort(self.lengths[run], descending=True, stable=True)].view(-1, self.global_batch)
            grouped.append(run[torch.randperm(len(run), generator=generator)])
        return torch.cat(grouped)

    def indices(self, micro_step: int) -> list[int]:
        """The indices this process uses at a given micro-step."""
        epoch, position = divmod(micro_step, self.per_epoch)
        if epoch != self._order_epoch:
            self._order, self._order_epoch = self._epoch_batches(epoch), epoch
        first = self.rank * self.batch_size
        return self._order[position, first : first + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for micro_step in range(self.start, self.stop):
            yield self.indices(micro_step)

    def __len__(self) -> int:
        return self.stop - self.start


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors moved to `device` inside nested dicts, lists and tuples (other values as they are)."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def trainable_summary(model: nn.Module, extra: Iterable[nn.Module] = ()) -> str:
    """'trainable parameters: N of M (p %)' over the model and any extra modules the optimizer trains."""
    params = {id(p): p for module in (model, *extra) for p in module.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %)"


class Trainer:
    """Runs `task(batch, generator=...) -> {"loss": ..., metrics...}` for cfg.train.steps optimizer steps.

    `task` may be a DDP wrapper; `model` is the bare model whose weights are checkpointed;
    `train_cfg` (default config.train) holds the stage's optimisation settings; with its `compile`
    the task runs through torch.compile.

    Batches come from `dataset` through a DataLoader, or, with `batch_fn`, from `batch_fn(micro_step)`
    (any nesting of dicts/lists/tuples of tensors; it must be a pure function of the micro-step so
    that a resumed run sees the same batches; meta-training draws its episodes this way), counted
    as `batch_items` examples each in the logs. `aux` names extra modules whose parameters the
    optimizer trains too (without weight decay) and that are saved beside the model as
    `<name>.safetensors` in every checkpoint and restored on resume (e.g. Meta-SGD's inner rates).
    """

    def __init__(self, task: nn.Module, model: nn.Module, dataset: Sequence[Any] | None, collate: Callable | None,
                 config: Config, tokenizer: Tokenizer, run_dir: Path, dist: DistInfo,
                 stage: str = "pretrain", progress: bool = True, train_cfg: TrainCfg | None = None, *,
                 batch_fn: Callable[[int], Any] | None = None, batch_items: int | None = None,
                 aux: Mapping[str, nn.Module] | None = None) -> None:
        if (dataset is None) == (batch_fn is None):
            raise ValueError("the Trainer takes its batches from a dataset or from batch_fn: give exactly one")
        self.config, self.cfg, self.tokenizer = config, train_cfg or config.train, tokenizer
        if self.cfg.gradient_checkpointing:
            if stage == "meta":  # the inner loop's functional calls and second-order grads go around the wrapper
                raise ConfigError("meta.train.gradient_checkpointing is not supported by meta-training: set it to false")
            enable_checkpointing(model)
        self.task = torch.compile(task) if self.cfg.compile else task  # the stage's own `compile` key
        self.model, self.dataset, self.collate = model, dataset, collate
        self.run_dir, self.dist, self.stage = Path(run_dir), dist, stage
        self.batch_fn, self.aux = batch_fn, dict(aux or {})
        self.batch_items = batch_items or self.cfg.batch_size
        self.progress = progress and dist.is_primary
        self.optimizer = build_optimizer(model, self.cfg)
        extra = [p for module in self.aux.values() for p in module.parameters() if p.requires_grad]
        if extra:
            self.optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        self.state = TrainerState(stage=stage)
        if self.progress:
            print(trainable_summary(model, self.aux.values()))

    def resume(self) -> int:
        """Load the newest intact checkpoint of the run (weights, optimizer, step); return the step."""
        checkpoint = latest_checkpoint(self.run_dir)  # verified; damaged newer ones are skipped, logged
        if checkpoint is None:
            return 0
        self.model.load_state_dict(load_tensors(require_file(checkpoint, MODEL_FILE)))
        for name, module in self.aux.items():
            module.load_state_dict(load_tensors(require_file(checkpoint, f"{name}.safetensors")))
        self.state = load_training_state(checkpoint, self.optimizer)
        self._rewrite_metrics()
        return self.state.step

    def fit(self, *, resume: bool = False, stop_at: int | None = None) -> TrainerState:
        """Train to cfg.steps (or stop early at `stop_at`, as if interrupted); save the final model.

        With `resume`, a run whose final model is already saved is left as it is (and says so).
        Before the first step the output folder is checked: staging left by interrupted saves is
        removed, and a read-only or full folder is an error now rather than at the first save.
        """
        if self.dist.is_primary:
            remove_stale_staging(self.run_dir)
        if resume and (done := finished_state(self.run_dir, self.stage, self.cfg.steps)) is not None:
            logger.warning("%s: the %s run already finished (step %d of %d); nothing to do",
                           self.run_dir, self.stage, done.step, self.cfg.steps)
            self.state = done
            return done
        if self.dist.is_primary:
            check_writable(self.run_dir, 3 * tensor_bytes(self.model, *self.aux.values()))  # weights + Adam's two
        if not (resume and self.resume()):  # a fresh start begins a fresh log
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        end = self.cfg.steps if stop_at is None else min(stop_at, self.cfg.steps)
        batches = self._batches(self.state.step * self.cfg.grad_accum, end * self.cfg.grad_accum)
        bar = tqdm(total=end, initial=self.state.step, desc=self.stage, disable=not self.progress, unit="step")
        window: list[dict[str, float]] = []
        tick = time.perf_counter()
        for step in range(self.state.step, end):
            window.append(self._train_step(step, batches))
            self.state.step = step + 1
            if self.state.step % self.cfg.log_every == 0 or self.state.step == end:
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                row = self._log(window, elapsed)
                bar.set_postfix(loss=f"{row['loss']:.3f}", sps=f"{row['samples_per_s']:.0f}")
                window = []
            bar.update(1)
            if self.state.step % self.cfg.save_every == 0 and self.state.step < self.cfg.steps:
                self._save_step_checkpoint()
        bar.close()
        if stop_at is None or end == self.cfg.steps:
            self._save_final()
        else:
            self._save_step_checkpoint()
        return self.state

    def _batches(self, start: int, stop: int) -> Iterator[Any]:
        """The batches of micro-steps start..stop-1: from batch_fn, or the dataset's deterministic sampler."""
        if self.batch_fn is not None:
            return (self.batch_fn(micro_step) for micro_step in range(start, stop))
        group = self.cfg.group_by_length
        if group and not callable(getattr(self.dataset, "lengths", None)):
            raise ConfigError(f"{self.stage}: group_by_length={group} needs a data set that knows its examples' "
                              f"lengths ({type(self.dataset).__name__} does not); set it to 0")
        lengths = self.dataset.lengths() if group else None
        sampler = StepBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, start, stop,
                                   self.dist.rank, self.dist.world_size, lengths, group)
        return iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.cfg.num_workers))

    def _train_step(self, step: int, batches: Iterator[Any]) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.cfg)
        sums: dict[str, float] = {}
        accum = self.cfg.grad_accum
        for micro in range(accum):
            batch = to_device(next(batches), self.dist.device)
            seed = (self.cfg.seed * 1_000_003 + step * 1009 + micro * 31 + self.dist.rank) % (2**63)
            torch.manual_seed(seed)  # dropout is a function of the step: resumed runs repeat it exactly
            generator = torch.Generator(self.dist.device).manual_seed(seed)
            sync = nullcontext() if micro == accum - 1 or not hasattr(self.task, "no_sync") else self.task.no_sync()
            with sync, torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                out = self.task(batch, generator=generator)
                (out["loss"] / accum).backward()
            for name, value in out.items():
                if torch.is_tensor(value) and value.ndim == 0:
                    sums[name] = sums.get(name, 0.0) + float(all_reduce_mean(value.detach(), self.dist)) / accum
        if self.cfg.clip_grad_norm > 0:
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm))
        self.optimizer.step()
        if isinstance(self.model, PersonaeModel):
            self.model.clamp_logit_scale_()  # the temperature's bound lives on the parameter, not in the forward
        self.optimizer.zero_grad(set_to_none=True)
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        return sums

    def _log(self, window: list[dict[str, float]], elapsed: float) -> dict[str, float]:
        row: dict[str, Any] = {"step": self.state.step, "stage": self.stage}
        for key in window[0]:
            row[key] = sum(w[key] for w in window) / len(window)
        samples = len(window) * self.batch_items * self.cfg.grad_accum * self.dist.world_size
        row["samples_per_s"] = samples / max(elapsed, 1e-9)
        self.state.history.append(row)
        if self.dist.is_primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def _rewrite_metrics(self) -> None:
        """After a resume the log holds exactly the rows up to the checkpoint's step."""
        if self.dist.is_primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(row) + "\n" for row in self.state.history)
            (self.run_dir / "metrics.jsonl").write_text(lines)

    def _save_step_checkpoint(self) -> None:
        if not self.dist.is_primary:
            return
        folder = self.run_dir / "checkpoints"
        save_checkpoint(folder / f"step_{self.state.step:07d}", self.model, self.config, self.tokenizer,
                        optimizer=self.optimizer, state=self.state, modules=self.aux)
        for old in sorted(folder.glob("step_*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def _save_final(self) -> None:
        if self.dist.is_primary:
            save_checkpoint(self.run_dir, self.model, self.config, self.tokenizer, state=self.state,
                            modules=self.aux)
