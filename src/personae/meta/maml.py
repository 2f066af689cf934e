"""MAML and its relatives on torch.func.functional_call: inner loops, meta-losses and the learner classes.

Everything here wraps a loss function ``loss_fn(params, batch) -> scalar`` (``params`` maps
parameter names to tensors) and knows nothing about images or text. Fast weights are plain
tensors; the module is never patched.

Meta-batches run in one of two ways, with the same numbers:

* **vmapped** (tasks stacked along a leading dimension, see :func:`stack_tasks`): the adapted
  parameters carry a task dimension ``(n, *shape)``, each loss is ``torch.func.vmap(loss_fn)``
  over tasks, and the inner gradients are ordinary ``torch.autograd.grad`` of the summed task
  losses (task i's loss depends only on its own slice, so the sum's gradient is each task's own).
  One batched pass per inner step instead of one per task, and ordinary autograd for the outer
  gradient, second order included.
* **looped**: one task at a time, for tasks whose batches cannot be stacked.

Under vmap, random ops (dropout) follow ``randomness`` ("different": each task draws its own
masks, like the loop does in distribution; "same": one mask for all; "error": refuse). Attention
runs on the math SDPA kernel while vmapped or differentiating twice: the fused CPU/GPU kernels
have neither a batching rule nor a double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from personae.config import INNER_OPTIMIZERS, INNER_PARAMS, RANDOMNESS_MODES, VMAP_MODES, MetaCfg
from personae.meta.tasks import Batch, StackError, Task, TaskBatch, stack_tasks
from personae.models.lora import LORA_MARKERS

Params = dict[str, torch.Tensor]
LossFn = Callable[[Params, Batch], torch.Tensor]
InnerLR = float | torch.Tensor | Mapping[str, torch.Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAPTED_PARAMS = tuple(p for p in INNER_PARAMS if p != "auto")  # what select_names takes: all | head | lora


# ----------------------------------------------------------------------------- functional core


@contextlib.contextmanager
def math_attention(enabled: bool) -> Iterator[None]:
    """The math SDPA kernel: differentiable twice and batchable by vmap (the fused kernels are neither)."""
    if not enabled:
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _descend(value: torch.Tensor, direction: torch.Tensor, lr: InnerLR, name: str) -> torch.Tensor:
    """value - lr * direction as one op (one new tensor): a float rate, or a learned tensor (Meta-SGD)."""
    rate = lr[name] if isinstance(lr, Mapping) else lr
    if isinstance(rate, torch.Tensor):
        return torch.addcmul(value, rate, direction, value=-1.0)
    return torch.add(value, direction, alpha=-rate)


def _adam_direction(grad: torch.Tensor, moments: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """Adam's bias-corrected m / sqrt(v) for one tensor; `moments` (m, v) is updated out of place.

    eps sits inside the root (sqrt(v + eps^2)) so that a second-order gradient stays finite where
    a gradient element is exactly zero (an embedding row the support set never uses).
    """
    beta1, beta2 = ADAM_BETAS
    m = moments.get("m", 0.0) * beta1 + grad * (1 - beta1)  # both start at zero
    v = moments.get("v", 0.0) * beta2 + grad * grad * (1 - beta2)
    moments["m"], moments["v"] = m, v
    return (m / (1 - beta1 ** step)) / torch.sqrt(v / (1 - beta2 ** step) + ADAM_EPS ** 2)


def _inner_step(fast: Params, frozen: Params, loss_of: Callable[[Params], torch.Tensor], lr: InnerLR,
                state: dict[str, dict[str, torch.Tensor]], step: int, *, optimizer: str, second_order: bool,
                create_graph: bool) -> Params:
    """One inner step theta' = theta - lr * d on the fast weights: d the gradient (sgd) or Adam's direction."""
    probe = fast if second_order else {k: v.detach().requires_grad_() for k, v in fast.items()}
    with torch.enable_grad():
        loss = loss_of({**frozen, **probe})
        grads = torch.autograd.grad(loss, list(probe.values()), create_graph=second_order, allow_unused=True)
    with contextlib.nullcontext() if create_graph else torch.no_grad():
        updated = {}
        for (name, value), grad in zip(fast.items(), grads):
            if grad is None:  # a parameter the loss does not use keeps its value (and costs no copy)
                updated[name] = value
                continue
            direction = grad if optimizer == "sgd" else _adam_direction(grad, state.setdefault(name, {}), step)
            updated[name] = _descend(value, direction, lr, name)
        return updated


def inner_trajectory(params: Params, names: Sequence[str], loss_of: Callable[[Params], torch.Tensor], *,
                     steps: int, lr: InnerLR, first_order: bool = False, create_graph: bool = True,
                     optimizer: str = "sgd") -> Iterator[Params]:
    """The fast weights (the `names` entries only) after 0, 1, ..., `steps` inner steps.

    create_graph=False: inference (nothing keeps a graph back to params). first_order=True: the
    inner gradients are constants, so the result depends on params (and lr) only through the update.
    optimizer "adam" keeps Adam's moments across the steps (fresh for each call).
    """
    if steps < 0:
        raise ValueError(f"inner steps must be >= 0, got {steps}")
    if optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"unknown inner optimizer {optimizer!r}; choose one of {', '.join(INNER_OPTIMIZERS)}")
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"cannot adapt {missing[0]!r}: it is not among the parameters ({len(params)} given)")
    second_order = create_graph and not first_order
    adapted = set(names)
    frozen = {k: v for k, v in params.items() if k not in adapted}
    if not second_order:  # inner gradients never reach the frozen parameters: keep no graph to them
        frozen = {k: v.detach() for k, v in frozen.items()}
    fast = {k: params[k] if create_graph else params[k].detach() for k in names}
    yield fast
    state: dict[str, dict[str, torch.Tensor]] = {}
    with math_attention(second_order):
        for step in range(1, steps + 1):
            fast = _inner_step(fast, frozen, loss_of, lr, state, step, optimizer=optimizer,
                               second_order=second_order, create_graph=create_graph)
            yield fast


def inner_loop(params: Params, names: Sequence[str], loss_of: Callable[[Params], torch.Tensor], *, steps: int,
               lr: InnerLR, first_order: bool = False, create_graph: bool = True, optimizer: str = "sgd") -> Params:
    """`steps` inner steps (see inner_trajectory) on the `names` entries; returns params with them adapted."""
    if steps == 0:
        return dict(params)
    for fast in inner_trajectory(params, names, loss_of, steps=steps, lr=lr, first_order=first_order,
                                 create_graph=create_graph, optimizer=optimizer):
        pass
    return {**params, **fast}


def adapt_task(params: Params, loss_fn: LossFn, support_batch: Batch, *, steps: int, lr: InnerLR,
          first_order: bool = False, create_graph: bool = True, names: Sequence[str] | None = None,
          optimizer: str = "sgd") -> Params:
    """Adapt params to one task's support batch (all entries, or only `names`); zero steps returns params."""
    return inner_loop(params, list(params) if names is None else list(names), lambda p: loss_fn(p, support_batch),
                      steps=steps, lr=lr, first_order=first_order, create_graph=create_graph, optimizer=optimizer)


def task_losses(loss_fn: LossFn, params: Params, names: Sequence[str], batch: Batch,
                randomness: str = "different") -> torch.Tensor:
    """(n,) losses of n stacked tasks: the `names` params and every batch tensor carry a leading task dimension."""
    fast = {name: params[name] for name in names}
    shared = {name: value for name, value in params.items() if name not in fast}  # captured, not mapped
    per_task = torch.func.vmap(lambda f, b: loss_fn({**shared, **f}, b), in_dims=(0, 0), randomness=randomness)
    return per_task(fast, batch)


def adapt_tasks(params: Params, loss_fn: LossFn, support: Batch, *, num_tasks: int, steps: int, lr: InnerLR,
                first_order: bool = False, create_graph: bool = True, names: Sequence[str] | None = None,
                randomness: str = "different", optimizer: str = "sgd") -> Params:
    """Adapt params to n stacked tasks at once: the `names` entries come back as (n, *shape) fast weights."""
    names = list(params) if names is None else list(names)
    batched = {k: (v.expand(num_tasks, *v.shape) if k in names else v) for k, v in params.items()}
    with math_attention(True):
        return inner_loop(batched, names, lambda p: task_losses(loss_fn, p, names, support, randomness).sum(),
                          steps=steps, lr=lr, first_order=first_order, create_graph=create_graph,
                          optimizer=optimizer)


def _vmap_hint(error: RuntimeError) -> RuntimeError:
    return RuntimeError(f"the loss cannot run under torch.func.vmap ({error}); it must have no data-dependent "
                        "shapes or Python branches on tensor values (e.g. boolean-mask indexing); "
                        "make it dense, or pass vmap='off' to loop over tasks")


def prepare_tasks(tasks: Sequence[Task] | TaskBatch, vmap: str,
                  pad_values: Mapping[str, float] | None) -> TaskBatch | list[Task]:
    """Stacked tasks when vmap applies, else a list; vmap='on' with unstackable tasks is an error."""
    if vmap not in VMAP_MODES:
        raise ValueError(f"unknown vmap mode {vmap!r}; choose one of {', '.join(VMAP_MODES)}")
    if isinstance(tasks, TaskBatch):
        return tasks if vmap != "off" else tasks.tasks()
    if vmap == "off":
        return list(tasks)
    try:
        return stack_tasks(tasks, pad_values)
    except StackError:
        if vmap == "on":
            raise
        return list(tasks)


def task_query_losses(params: Params, loss_fn: LossFn, tasks: Sequence[Task] | TaskBatch, *, steps: int,
                      lr: InnerLR, first_order: bool = False, create_graph: bool = True,
                      names: Sequence[str] | None = None, vmap: str = "auto",
                      pad_values: Mapping[str, float] | None = None, randomness: str = "different",
                      optimizer: str = "sgd") -> torch.Tensor:
    """(n,) query losses of n tasks, each after adapting params on its support set."""
    names = list(params) if names is None else list(names)
    prepared = prepare_tasks(tasks, vmap, pad_values)
    if isinstance(prepared, TaskBatch):
        n = prepared.num_tasks
        try:
            adapted = adapt_tasks(params, loss_fn, prepared.support, num_tasks=n, steps=steps, lr=lr,
                                  first_order=first_order, create_graph=create_graph, names=names,
                                  randomness=randomness, optimizer=optimizer)
            with math_attention(True):
                return task_losses(loss_fn, adapted, names, prepared.query, randomness)
        except RuntimeError as error:
            if "vmap" in str(error) and any(w in str(error) for w in ("data-dependent", "dynamic shape")):
                raise _vmap_hint(error) from error
            raise
    losses = []
    for support, query in prepared:
        adapted = adapt_task(params, loss_fn, support, steps=steps, lr=lr, first_order=first_order,
                        create_graph=create_graph, names=names, optimizer=optimizer)
        with math_attention(create_graph and not first_order):
            losses.append(loss_fn(adapted, query))
    return torch.stack(losses)


def meta_loss(params: Params, loss_fn: LossFn, tasks: Sequence[Task] | TaskBatch, **options: object) -> torch.Tensor:
    """Mean query loss over a meta-batch after per-task adaptation; differentiable w.r.t. params and lr."""
    return task_query_losses(params, loss_fn, tasks, **options).mean()  # type: ignore[arg-type]


def module_loss(module: nn.Module, output: str = "loss") -> LossFn:
    """loss_fn(params, batch) = module(batch) run with `params` (missing names: the module's own)."""

    def loss_fn(params: Params, batch: Batch) -> torch.Tensor:
        out = functional_call(module, params, (batch,), strict=False)
        return out[output] if isinstance(out, Mapping) else out

    return loss_fn


# ----------------------------------------------------------------------------- learners


def select_names(module: nn.Module, inner_params: str, head: Sequence[str] = ("decoder.ln_f",)) -> list[str]:
    """The names of the trainable parameters the inner loop adapts: all, the head's, or the LoRA ones."""
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    if inner_params == "all":
        names = trainable
    elif inner_params == "head":
        names = [n for n in trainable if any(n == h or n.startswith(h + ".") for h in head)]
    elif inner_params == "lora":
        names = [n for n in trainable if n.rsplit(".", 1)[-1] in LORA_MARKERS]
    else:
        raise ValueError(f"unknown meta.inner_params {inner_params!r}; choose one of {', '.join(ADAPTED_PARAMS)}")
    if not names:
        hint = {"head": f"no trainable parameter under {', '.join(head)} (the head prefixes)",
                "lora": "no LoRA parameter: call personae.models.lora.add_decoder_lora(model, rank, alpha) first",
                "all": "the module has no trainable parameter"}[inner_params]
        raise ValueError(f"meta.inner_params={inner_params!r}: {hint}")
    return names


def _lr_key(name: str) -> str:
    return name.replace(".", "/")  # ParameterDict keys cannot hold dots


class MetaLearner(nn.Module):
    """A module with an inner loop: `adapt` a task's support set to fast weights, `meta_loss` a meta-batch.

    `forward(tasks)` is `meta_loss(tasks)`, so a trainer (or DDP) can call the learner like a task
    module and backpropagate: the gradient reaches the module's parameters and the learned inner
    rates (`inner_lrs`, Meta-SGD) when `learn_inner_lr` is on.
    """

    algo: ClassVar[str] = "maml"
    forced_first_order: ClassVar[bool] = False
    default_inner_params: ClassVar[str] = "all"

    def __init__(self, module: nn.Module, cfg: MetaCfg | None = None, loss_fn: LossFn | None = None, *,
                 head: Sequence[str] = ("decoder.ln_f",), pad_values: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.module, self.cfg = module, cfg or MetaCfg(algo=self.algo)
        self._check_cfg()
        self.loss_fn = loss_fn or module_loss(module)
        self.head, self.pad_values = tuple(head), dict(pad_values or {})
        self.inner_params = self.default_inner_params if self.cfg.inner_params == "auto" else self.cfg.inner_params
        self.names = select_names(module, self.inner_params, self.head)
        self.first_order = self.forced_first_order or self.cfg.first_order
        self.inner_lrs = nn.ParameterDict()
        if self.cfg.learn_inner_lr:
            own = dict(module.named_parameters())
            for name in self.names:
                self.inner_lrs[_lr_key(name)] = nn.Parameter(torch.full_like(own[name], self.cfg.inner_lr))

    def _check_cfg(self) -> None:
        cfg = self.cfg
        if cfg.inner_params not in INNER_PARAMS:
            raise ValueError(f"unknown meta.inner_params {cfg.inner_params!r}; choose one of {', '.join(INNER_PARAMS)}")
        if cfg.inner_params not in ("auto", self.default_inner_params) and self.default_inner_params != "all":
            raise ValueError(f"meta.algo={self.algo!r} adapts {self.default_inner_params!r} by definition, "
                             f"not meta.inner_params={cfg.inner_params!r}; use maml with "
                             f"inner_params={cfg.inner_params!r} instead")
        if cfg.vmap not in VMAP_MODES:
            raise ValueError(f"unknown meta.vmap {cfg.vmap!r}; choose one of {', '.join(VMAP_MODES)}")
        if cfg.randomness not in RANDOMNESS_MODES:
            raise ValueError(f"unknown meta.randomness {cfg.randomness!r}; choose one of "
                             f"{', '.join(RANDOMNESS_MODES)}")
        if cfg.inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"unknown meta.inner_optimizer {cfg.inner_optimizer!r}; choose one of "
                             f"{', '.join(INNER_OPTIMIZERS)}")
        if cfg.inner_steps < 0 or cfg.inner_lr < 0:
            raise ValueError(f"meta.inner_steps and meta.inner_lr must be >= 0, got {cfg.inner_steps}, {cfg.inner_lr}")

    def params(self) -> Params:
        """Every parameter of the module by name (the live nn.Parameters: gradients reach them)."""
        return dict(self.module.named_parameters())

    def inner_lr(self) -> InnerLR:
        """The inner learning rate: a float, or one learned tensor per adapted parameter (Meta-SGD)."""
        if not self.cfg.learn_inner_lr:
            return self.cfg.inner_lr
        return {name: self.inner_lrs[_lr_key(name)] for name in self.names}

    def inner_lr_tensors(self) -> dict[str, torch.Tensor]:
        """The learned rates by parameter name (empty without Meta-SGD), e.g. to save beside a checkpoint."""
        lr = self.inner_lr()
        return {k: v.detach() for k, v in lr.items()} if isinstance(lr, Mapping) else {}

    def load_inner_lr_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore rates saved by inner_lr_tensors (names must match the adapted parameters)."""
        if set(tensors) != set(self.names if self.cfg.learn_inner_lr else []):
            raise KeyError(f"inner rates for {sorted(tensors)[:3]}... do not match the adapted parameters")
        with torch.no_grad():
            for name, value in tensors.items():
                self.inner_lrs[_lr_key(name)].copy_(value)

    def adapt(self, support: Batch, *, steps: int | None = None, create_graph: bool = False) -> Params:
        """Fast weights (the adapted parameters only) after `steps` (default cfg.inner_steps) on a support batch."""
        steps = self.cfg.inner_steps if steps is None else steps
        adapted = adapt_task(self.params(), self.loss_fn, support, steps=steps, lr=self.inner_lr(),
                        first_order=self.first_order, create_graph=create_graph, names=self.names,
                        optimizer=self.cfg.inner_optimizer)
        return {name: adapted[name] for name in self.names}

    def loss(self, fast: Params, batch: Batch) -> torch.Tensor:
        """The loss on a batch with fast weights in place of the module's own."""
        return self.loss_fn({**self.params(), **fast}, batch)

    def call(self, fast: Params, *args: object, **kwargs: object) -> object:
        """Run the module (forward) with fast weights: the adapted model, no copy of the module."""
        return functional_call(self.module, fast, args, kwargs, strict=False)

    def query_losses(self, tasks: Sequence[Task] | TaskBatch) -> torch.Tensor:
        """(n,) query losses after adapting to each task's support set, with the graph for the outer step."""
        return task_query_losses(self.params(), self.loss_fn, tasks, steps=self.cfg.inner_steps,
                                 lr=self.inner_lr(), first_order=self.first_order, create_graph=True,
                                 names=self.names, vmap=self.cfg.vmap, pad_values=self.pad_values,
                                 randomness=self.cfg.randomness, optimizer=self.cfg.inner_optimizer)

    def meta_loss(self, tasks: Sequence[Task] | TaskBatch) -> torch.Tensor:
        """Mean query loss after adaptation: backpropagate it for the outer (meta) gradient."""
        if (tasks.num_tasks if isinstance(tasks, TaskBatch) else len(tasks)) == 0:
            raise ValueError("the meta-batch has no task")
        return self.query_losses(tasks).mean()

    def forward(self, tasks: Sequence[Task] | TaskBatch) -> torch.Tensor:
        return self.meta_loss(tasks)


class MAML(MetaLearner):
    """MAML (Finn et al. 2017): second-order meta-gradient through the inner SGD steps on all parameters."""

    algo = "maml"


class FOMAML(MetaLearner):
    """First-order MAML: the inner gradients are treated as constants (no second derivatives)."""

    algo = "fomaml"
    forced_first_order = True


class ANIL(MetaLearner):
    """ANIL (Raghu et al. 2020): the inner loop adapts the output head only; the body is learned outside.

    Our LM head is tied to the token embeddings, so "head" is the part that only the output uses:
    the final LayerNorm `decoder.ln_f` (a per-feature scale and shift of the state the tied
    projection reads). Pass `head=(...)` for more, e.g. `decoder.tok_embed` (which then also
    changes the input embeddings, since the two are one tensor).
    """

    algo = "anil"
    default_inner_params = "head"


class LoRAMAML(MetaLearner):
    """LoRA-MAML: the inner loop adapts only the LoRA adapters; the outer loop learns base weights and adapter init."""

    algo = "lora-maml"
    default_inner_params = "lora"
