"""One meta-training step: personae.meta (vmap over tasks) vs `higher.innerloop_ctx` (a loop over tasks).

A step is the outer update of MAML on a meta-batch: for each of 8 tasks, 5 inner SGD steps on its
support set, the query loss at the adapted weights, the meta-gradient back to the initial weights
(second order, or first order), then one Adam step and zero_grad. Both run the same model class
with the same weights (a tiny personae causal decoder with a dense next-token loss), the same
synthetic token batches, the same inner rate, the same math SDPA kernel (the fused kernels have no
double backward), and produce the same gradients (checked to 1e-4 before timing).

personae stacks the tasks and runs each inner step as one vmapped pass with ordinary autograd;
higher patches the module and loops over the tasks. First order with higher is the usual recipe:
`track_higher_grads=False` (fast weights without a graph), then the query gradient w.r.t. the
adapted weights is added to the initial weights' gradients.

Timed alternately round by round (medians, paired ratios); peak memory is the growth of the
process's peak resident set during one step (Linux: the peak is reset before the step), measured
after the timing, median of 3. One JSON line per figure on stdout, notes on stderr:

    .venv/bin/python bench/meta_step.py                 # second and first order, torch's default threads
    .venv/bin/python bench/meta_step.py --threads 1     # single-threaded (about a minute on a quiet machine)
    .venv/bin/python bench/meta_step.py --quick         # smoke run: 3 rounds
    .venv/bin/python bench/meta_step.py --width 64 --depth 1 --vocab 512 --seq 32 --threads 1
    .venv/bin/python bench/meta_step.py --profile       # torch.profiler tables instead of timing

See docs/guide/benchmarks.md for measured figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, emit, env_info, median, note, set_threads, spread  # noqa: E402

from personae.config import DecoderCfg  # noqa: E402
from personae.meta import FOMAML, MAML, MetaCfg, TaskBatch  # noqa: E402
from personae.models.decoder import Decoder  # noqa: E402

BENCH = "meta_step"
GOAL = 3.0  # personae meta-steps/s >= GOAL x higher's (the target)
MODES = ("second", "first")


class TokenLM(nn.Module):
    """A personae decoder with a dense next-token loss (no data-dependent shapes, so vmap can batch it)."""

    def __init__(self, width: int, depth: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        cfg = DecoderCfg(enabled=True, width=width, depth=depth, heads=heads, max_len=seq)
        self.decoder = Decoder(cfg, vocab, image_width=width)
        del self.decoder.image_proj  # text only: no unused parameters on either side

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.decoder(self.decoder.tok_embed(batch["input_ids"]))  # (B, T, D)
        logits = self.decoder.logits(hidden[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def make_model(args: argparse.Namespace) -> TokenLM:
    torch.manual_seed(0)
    return TokenLM(args.width, args.depth, args.heads, args.vocab, args.seq).eval()  # eval: no dropout


def make_tasks(args: argparse.Namespace, seed: int = 0) -> TaskBatch:
    """n tasks, each its own random bigram-ish sequences: (n, k, T) support and (n, q, T) query."""
    g = torch.Generator().manual_seed(seed)
    n, T = args.tasks, args.seq

    def role(size: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, args.vocab, (n, size, T), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}

    return TaskBatch(role(args.support), role(args.query))


# ----------------------------------------------------------------------------- implementations


def personae_step(args: argparse.Namespace, mode: str, tasks: TaskBatch,
                  vmap: str = "on") -> tuple[Callable[[], None], nn.Module]:
    model = make_model(args)
    cfg = MetaCfg(algo="maml" if mode == "second" else "fomaml", inner_steps=args.steps, inner_lr=args.inner_lr,
                  vmap=vmap)
    learner = (MAML if mode == "second" else FOMAML)(model, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def backward() -> None:
        learner.meta_loss(tasks).backward()

    return with_outer_step(backward, optimizer), model


def with_outer_step(backward: Callable[[], None], optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One meta-step: BACKWARD then the outer optimiser's step; `.backward` alone stays reachable."""
    def step() -> None:
        backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.backward = backward  # type: ignore[attr-defined]
    return step


def higher_step(args: argparse.Namespace, mode: str, tasks: TaskBatch) -> tuple[Callable[[], None], nn.Module]:
    import higher

    model = make_model(args)
    params = list(model.parameters())
    inner_optimizer = torch.optim.SGD(params, lr=args.inner_lr)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    task_list, second = tasks.tasks(), mode == "second"

    def backward() -> None:
        with sdpa_kernel([SDPBackend.MATH]):
            for support, query in task_list:
                with higher.innerloop_ctx(model, inner_optimizer, copy_initial_weights=False,
                                          track_higher_grads=second) as (fmodel, diffopt):
                    for _ in range(args.steps):
                        diffopt.step(fmodel(support))
                    query_loss = fmodel(query) / len(task_list)
                    if second:
                        query_loss.backward()
                        continue
                    for p, g in zip(params, torch.autograd.grad(query_loss, fmodel.parameters())):
                        p.grad = g if p.grad is None else p.grad + g

    return with_outer_step(backward, optimizer), model


def personae_loop_step(args: argparse.Namespace, mode: str, tasks: TaskBatch) -> tuple[Callable[[], None], nn.Module]:
    return personae_step(args, mode, tasks, vmap="off")


IMPLS = {"personae": personae_step, "higher": higher_step, "personae-loop": personae_loop_step}


def impls(args: argparse.Namespace) -> dict[str, Callable[..., tuple[Callable[[], None], nn.Module]]]:
    """The implementations to run: personae (vmap) and higher, and personae's task loop with --with-loop."""
    return {name: build for name, build in IMPLS.items() if name != "personae-loop" or args.with_loop}


def check_same_gradients(args: argparse.Namespace, mode: str, tasks: TaskBatch) -> float:
    """Max abs difference of the two meta-gradients from the same weights; raises when they disagree."""
    grads = {}
    for name, build in impls(args).items():
        step, model = build(args, mode, tasks)
        step.backward()  # type: ignore[attr-defined]
        grads[name] = [p.grad.detach().clone() for p in model.parameters()]
    diff = max((a - b).abs().max().item() for name in grads for a, b in zip(grads[name], grads["higher"]))
    scale = max(g.abs().max().item() for g in grads["higher"])
    if diff > 1e-4 * max(1.0, scale):
        raise RuntimeError(f"{mode} order: personae and higher meta-gradients differ by {diff:.3g} (scale {scale:.3g})")
    return diff


# ----------------------------------------------------------------------------- memory


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mib(step: Callable[[], None], repeats: int = 3) -> float | None:
    """Peak resident-memory growth during one step (MiB, median of `repeats`); None where Linux's /proc lacks it.

    Before each step: collect garbage, hand freed heap pages back to the system (malloc_trim), and
    reset the process's peak (writing 5 to /proc/self/clear_refs), so the peak seen afterwards is
    this step's: the most memory it held at once beyond what was held before it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        samples = []
        for _ in range(repeats):
            gc.collect()
            libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_bytes("VmRSS")
            step()
            samples.append((_status_bytes("VmHWM") - before) / 2**20)
    except (OSError, RuntimeError):
        return None
    return statistics.median(samples)


# ----------------------------------------------------------------------------- main


def profile(steps: dict[str, Callable[[], None]], rows: int = 20) -> None:
    from torch.profiler import profile as torch_profile

    for name, step in steps.items():
        step()
        with torch_profile() as prof:
            step()
        events = prof.key_averages()
        note(f"\n=== {name}: one step, {sum(e.count for e in events)} ops ===")
        note(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    tasks = make_tasks(args)
    diff = check_same_gradients(args, mode, tasks)
    steps = {name: build(args, mode, tasks)[0] for name, build in impls(args).items()}
    if args.profile:
        profile({f"{name}-{mode}": step for name, step in steps.items()})
        return {}
    times = alternate(steps, rounds=args.rounds, warmup=args.warmup)
    common = {"bench": BENCH, "order": mode, "tasks": args.tasks, "inner_steps": args.steps, "support": args.support,
              "query": args.query, "seq": args.seq, "width": args.width, "depth": args.depth, "vocab": args.vocab,
              "threads": args.threads_used, "rounds": args.rounds}
    memory = {name: (None if args.no_memory else peak_mib(step)) for name, step in steps.items()}
    for name, ts in times.items():
        emit(**common, impl=name, step_ms=1e3 * median(ts), iqr=spread(ts), peak_mib=memory[name])
    speedup = statistics.median(h / p for h, p in zip(times["higher"], times["personae"]))
    mem_ratio = memory["higher"] / memory["personae"] if memory["personae"] else None
    extra = {}
    if "personae-loop" in times:
        extra["speedup_loop"] = statistics.median(h / p for h, p in zip(times["higher"], times["personae-loop"]))
    emit(**common, kind="ratio", ours="personae", peer="higher", speedup=speedup, memory_ratio=mem_ratio,
         max_grad_diff=diff, goal=GOAL, met=speedup >= GOAL, **extra)
    return {"speedup": speedup}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per meta-batch (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="inner steps (default 5)")
    parser.add_argument("--support", type=int, default=5, help="sequences per support set (default 5)")
    parser.add_argument("--query", type=int, default=5, help="sequences per query set (default 5)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    parser.add_argument("--width", type=int, default=32, help="decoder width (default 32)")
    parser.add_argument("--depth", type=int, default=2, help="decoder blocks (default 2)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (default 2)")
    parser.add_argument("--vocab", type=int, default=128, help="vocabulary size (default 128)")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="inner SGD rate (default 0.1)")
    parser.add_argument("--orders", default="second,first", help="second,first (default both)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--with-loop", action="store_true", help="also time personae looping over tasks (vmap off)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead of timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore")
    try:
        import higher  # noqa: F401
    except ImportError:
        sys.exit("bench/meta_step.py needs higher: pip install -c constraints.txt higher")
    args.threads_used = set_threads(args.threads or None)
    emit(bench=BENCH, kind="env", **env_info())
    for mode in [m.strip() for m in args.orders.split(",") if m.strip()]:
        if mode not in MODES:
            sys.exit(f"unknown order {mode!r}; choose from {', '.join(MODES)}")
        note(f"[{mode} order] {args.tasks} tasks x {args.steps} inner steps, {args.rounds} rounds")
        run_mode(args, mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
