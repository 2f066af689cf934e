"""Shared helpers for the benchmarks in bench/: threads, timing, JSON-line output, matmul peak.

Every benchmark runs the peer and personae in the same process and prints one JSON object per
line on stdout (human notes go to stderr), so results can be collected with `jq` or pandas.
These machines are shared and noisy: measure implementations alternately, round by round, and
report medians rather than means or single runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import torch


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: leave torch's default); returns the count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def emit(**fields: Any) -> dict[str, Any]:
    """Print one JSON line on stdout (floats rounded to 4 significant digits) and return it."""
    row = {k: _round(v) for k, v in fields.items()}
    print(json.dumps(row), flush=True)
    return row


def note(*parts: Any) -> None:
    """A human-readable progress line on stderr (keeps stdout pure JSON lines)."""
    print(*parts, file=sys.stderr, flush=True)


def _round(value: Any) -> Any:
    if isinstance(value, float) and value != 0.0:
        return float(f"{value:.4g}")
    return value


def env_info() -> dict[str, Any]:
    """What a result depends on: date, torch version, threads, CPU count and name."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_once(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, on_round: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """Time each callable once per round, alternating between them; returns seconds per call.

    The order is reversed every other round (A B C, C B A, ...) so that a slow drift of the
    machine's load does not favour whichever implementation happens to run first.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(time_once(fns[name]))
        if on_round is not None:
            on_round(r)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative interquartile range (IQR / median), a noise figure that ignores outliers."""
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


class MatmulProbe:
    """One n x n x n fp32 (or `dtype`) torch.mm per call: the machine's matmul speed right now.

    Add it to the callables of :func:`alternate` to sample the peak in the same rounds (and so
    under the same load from the neighbours) as the models; :meth:`flops` turns a list of its
    timings into FLOP/s.
    """

    def __init__(self, n: int = 2048, dtype: torch.dtype = torch.float32) -> None:
        self.n, self.dtype = n, dtype
        self.a = torch.randn(n, n, dtype=dtype)
        self.b = torch.randn(n, n, dtype=dtype)
        self.out = torch.empty(n, n, dtype=dtype)
        self()  # warm-up: thread pool, allocator

    def __call__(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def flops(self, seconds: float) -> float:
        return 2.0 * self.n**3 / seconds


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Achievable matmul FLOP/s: the best of `repeats` timings of an n x n x n torch.mm.

    The best rather than the median, because it stands for what the cores can do when the
    neighbours are quiet; a model's utilisation against it is then a conservative figure.
    """
    probe = MatmulProbe(n, dtype)
    return probe.flops(min(time_once(probe) for _ in range(repeats)))
