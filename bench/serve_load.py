"""Load test of `personae serve`: continuous batching vs one request at a time, in the same run.

Two real servers run on 127.0.0.1 as subprocesses of this script, one with batching and one with
``batching=False``, on the same fine-tuned run. For 1, 8, 32 and 64 concurrent clients (each
sending a bounded number of requests, one after another) both are loaded in turn (the order
alternates by level, so that a drift of the shared machine's load favours neither), with
32-token replies (``ignore_eos``: every reply is exactly 32 tokens). One JSON line per figure on
stdout: requests/s, tokens/s, p50/p99 latency, errors and the mean batch per mode and level, the
batched/unbatched tokens/s ratio per level, and each server's peak memory (VmHWM).

    .venv/bin/python bench/serve_load.py --quick          # ~1 minute on 2 cores
    .venv/bin/python bench/serve_load.py                  # 4 requests per client
    .venv/bin/python bench/serve_load.py --run RUN --clients 1 8 32 64 --requests-per-client 8

Without --run a fine-tuned run of --preset (tiny by default; 2 pretraining + 2 fine-tuning steps:
untrained, but the shapes and costs of the real thing) is built once under --cache.
Goal (issue 5): zero errors at 64 clients, and batched >= 4x the tokens/s of one-at-a-time at 32.

``--adapters N`` gives N characters a random rank-4 LoRA adapter (in a copy of the run) and spreads
the clients over them, so every batch mixes N adapters (applied per row); a third server,
``batched_plain``, serves the run without adapters to the same clients, and the line
``adapter_overhead`` gives batched-with-adapters / batched-without tokens/s per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, env_info, note

BENCH = "serve_load"
GOAL_RATIO, GOAL_LEVEL = 4.0, 32


def build_run(cache: Path, preset: str) -> Path:
    """A fine-tuned run of `preset` (built once, then reused)."""
    cache = cache / preset
    run = cache / "finetuned"
    if (run / "model.safetensors").exists():
        return run
    from personae.config import apply_overrides, load_preset
    from personae.train.finetune import run_config, run_finetune
    from personae.train.pretrain import run_pretrain
    from personae.world import build_world

    note(f"building a {preset} fine-tuned run under {cache} (once)")
    cfg = apply_overrides(load_preset(preset), ["train.steps=2", "train.warmup_steps=1", "train.batch_size=16"])
    build_world(cache / "world", seed=0, scenes=300, image_size=cfg.model.vision.image_size, progress=False)
    run_pretrain(cache / "world", cache / "pretrained", cfg, progress=False)
    tuning = ["finetune.train.steps=2", "finetune.train.warmup_steps=1", "finetune.train.batch_size=8"]
    run_finetune(cache / "pretrained", cache / "world", run, apply_overrides(run_config(cache / "pretrained"), tuning),
                 progress=False)
    return run


class Server:
    """`personae.serve.server.serve` in a subprocess; knows its URL and reads its peak memory."""

    def __init__(self, run: Path, port: int, threads: int, **settings: Any) -> None:
        call = (f"from personae.serve.server import serve; serve({str(run)!r}, port={port}, "
                f"torch_threads={threads}, **{settings!r})")
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-c", call], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server at {self.url} did not start in {timeout} s")

    def peak_memory_mib(self) -> float:
        """The server process's peak resident memory (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/stats", timeout=10).json()["scheduler"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection on asyncio streams.

    httpx's AsyncClient spends milliseconds of CPU per request in its connection pool once tens of
    connections are open (162 GET /health per second at 64 clients on 2 cores, against 5,000 with
    this class), which would make the client, not the server, the bottleneck of this benchmark.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        self.writer.write(head + payload)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def add_random_adapters(run: Path, count: int, cache: Path) -> tuple[Path, list[str]]:
    """A copy of RUN where the first COUNT characters have a random LoRA adapter; the run and their models."""
    import shutil

    import torch

    from personae.models.io import load_model
    from personae.models.lora import add_decoder_lora, lora_parameters, save_adapter

    target = cache / f"{run.name}-adapters{count}"
    if not target.exists():
        shutil.copytree(run, target, ignore=shutil.ignore_patterns("adapters", "checkpoints"))
        model, _, _ = load_model(target)
        add_decoder_lora(model, 4, 8.0)
        generator = torch.Generator().manual_seed(0)
        for character in sorted(p.stem for p in (target / "characters").glob("*.json"))[:count]:
            tensors = {name: torch.randn(p.shape, generator=generator) * (0.02 if name.endswith("lora_B") else 0.3)
                       for name, p in lora_parameters(model).items()}
            save_adapter(target / "adapters" / f"{character}.safetensors", tensors,
                         {"character": character, "inner_params": "lora", "lora_rank": 4, "lora_alpha": 8.0,
                          "lora_added": True})
    characters = sorted(p.stem for p in (target / "adapters").glob("*.safetensors"))
    return target, ["personae/" + c for c in characters]


async def load(url: str, model: str | list[str], clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """`clients` concurrent clients, each sending `per_client` requests in a row; latencies and counts."""
    latencies: list[float] = []
    tokens = errors = 0
    host, port = url.removeprefix("http://").split(":")

    models = [model] if isinstance(model, str) else model

    async def client(index: int) -> None:
        nonlocal tokens, errors
        connection = Connection(host, int(port))
        for k in range(per_client):
            body = {"model": models[index % len(models)], "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8,
                    "seed": index * 1000 + k,
                    "messages": [{"role": "user", "content": f"Client {index} asks question {k}: what do you see?"}]}
            start = time.perf_counter()
            try:
                status, answer = await connection.post_json("/v1/chat/completions", body)
            except (OSError, ValueError, asyncio.IncompleteReadError):
                errors += 1
                connection.close()
                connection = Connection(host, int(port))
                continue
            if status != 200:
                errors += 1
                continue
            tokens += answer["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
        connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "tokens_per_s": tokens / elapsed, "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99)}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def run_level(servers: dict[str, Server], clients: int, args: argparse.Namespace, order: list[str],
              model: str | list[str]) -> dict[str, dict[str, Any]]:
    """Load each server in `order` with the same clients; returns the figures per mode."""
    results = {}
    for mode in order:
        before = servers[mode].stats()
        figures = asyncio.run(load(servers[mode].url, model, clients, args.requests_per_client, args.max_tokens))
        after = servers[mode].stats()
        steps = after["steps"] - before["steps"]
        figures["mean_batch"] = (after["tokens"] - before["tokens"]) / steps if steps else 0.0
        results[mode] = figures
        emit(bench=BENCH, figure="load", mode=mode, clients=clients, **figures)
        note(f"{mode:>10} x{clients:<3} {figures['tokens_per_s']:8.1f} tok/s  p50 {figures['p50_s']:.3f} s  "
             f"p99 {figures['p99_s']:.3f} s  errors {figures['errors']}  mean batch {figures['mean_batch']:.1f}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a fine-tuned run (default: build a tiny one)")
    parser.add_argument("--preset", default="tiny", help="preset of the run built without --run")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/personae-bench-serve"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=64, help="the batched server's max_batch")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each server")
    parser.add_argument("--port", type=int, default=8731)
    parser.add_argument("--quick", action="store_true", help="1 request per client at 1, 8, 32 and 64 clients")
    parser.add_argument("--adapters", type=int, default=0, help="characters with a random LoRA adapter, mixed per batch")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests_per_client = 1
    run = plain = args.run or build_run(args.cache, args.preset)
    model: str | list[str] = "personae/" + min(p.stem for p in (run / "characters").glob("*.json"))
    if args.adapters:
        run, model = add_random_adapters(plain, args.adapters, args.cache)
    emit(bench=BENCH, figure="env", run=str(run), preset=args.preset if args.run is None else None,
         max_tokens=args.max_tokens, server_threads=args.threads, requests_per_client=args.requests_per_client,
         **env_info())
    queue = max(args.clients) + 8
    servers = {"batched": Server(run, args.port, args.threads, max_batch=args.max_batch, max_queue=queue,
                                 max_tokens_limit=args.max_tokens),
               "one_at_a_time": Server(run, args.port + 1, args.threads, batching=False, max_queue=queue,
                                       max_tokens_limit=args.max_tokens)}
    if args.adapters:
        servers["batched_plain"] = Server(plain, args.port + 2, args.threads, max_batch=args.max_batch,
                                          max_queue=queue, max_tokens_limit=args.max_tokens)
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up: first-call allocations and lazy imports
            asyncio.run(load(server.url, model, 2, 1, args.max_tokens))
        report(servers, args, model)
    finally:
        for server in servers.values():
            server.stop()
    return 0


def report(servers: dict[str, Server], args: argparse.Namespace, model: str | list[str]) -> None:
    """Run every level, then print the ratios, the goal checks and the peak memory."""
    ratios = {}
    for i, clients in enumerate(args.clients):
        order = list(servers) if i % 2 == 0 else list(servers)[::-1]
        results = run_level(servers, clients, args, order, model)
        if "batched_plain" in results:
            emit(bench=BENCH, figure="adapter_overhead", clients=clients, adapters=args.adapters,
                 ratio=results["batched"]["tokens_per_s"] / max(results["batched_plain"]["tokens_per_s"], 1e-9))
        ratio = results["batched"]["tokens_per_s"] / max(results["one_at_a_time"]["tokens_per_s"], 1e-9)
        ratios[clients] = ratio
        emit(bench=BENCH, figure="batching_speedup", clients=clients, ratio=ratio,
             errors=results["batched"]["errors"] + results["one_at_a_time"]["errors"])
    for mode, server in servers.items():
        emit(bench=BENCH, figure="server_peak_memory", mode=mode, mib=server.peak_memory_mib())
    if GOAL_LEVEL in ratios:
        emit(bench=BENCH, figure="goal", clients=GOAL_LEVEL, ratio=ratios[GOAL_LEVEL], target=GOAL_RATIO,
             met=ratios[GOAL_LEVEL] >= GOAL_RATIO)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
