"""Soak test of `personae serve`: a real server process on 127.0.0.1, hostile and valid clients, bounded in time.

Starts ``personae serve RUN`` in a subprocess (small limits, so that oversized and slow requests
are quick to make), then runs CLIENTS threads that send a mix of requests until REQUESTS are
answered or SECONDS have passed: valid chats (plain and streamed), streams dropped after their
first chunk, text completions, malformed bodies (bad JSON, strings for integers, lone surrogates,
unknown routes, undecodable images), bodies over ``max_body_bytes``, text over ``max_text_bytes``,
clients that trickle their body (cut off by ``body_timeout_s``) and clients that trickle their
headers (disconnected after ``header_timeout_s``). Meanwhile a watcher times
``GET /health`` every 0.1 s, and the server's RSS is read at the start, the middle and the end.

Every request kind has the status (and error code) docs/guide/api.md gives it; the report counts
requests by status class and lists every answer that differed. Developer tool (not shipped):

    PYTHONPATH=src python tools/soak_server.py RUN --requests 2000 --seconds 600 --clients 4
    PYTHONPATH=src python tools/soak_server.py RUN --huge 4194304   # three 4 MB chats, /health meanwhile
"""

from __future__ import annotations

import argparse
import base64
import collections
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# the limits the soak server runs with: small, so that refusals cost little
LIMITS = {"max_body_bytes": 2 * 1024 * 1024, "max_text_bytes": 256 * 1024, "body_timeout_s": 2, "header_timeout_s": 2,
          "max_queue": 256}
CHARACTER = "personae/chef-baptiste"


def _chat(text: str = "What do you see?", **fields: Any) -> dict[str, Any]:
    return {"model": CHARACTER, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **fields}


def _json_post(client: httpx.Client, url: str, path: str, body: Any) -> tuple[int, str | None]:
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    response = client.post(url + path, content=raw, headers={"Content-Type": "application/json"})
    return response.status_code, _code(response)


def _get(client: httpx.Client, url: str, path: str) -> tuple[int, str | None]:
    response = client.get(url + path)
    return response.status_code, _code(response)


def _code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _stream(client: httpx.Client, url: str, drop_after_first: bool) -> tuple[int, str | None]:
    with client.stream("POST", url + "/v1/chat/completions", json=_chat(stream=True, max_tokens=24)) as response:
        for line in response.iter_lines():
            if drop_after_first and line.startswith("data: "):
                break  # the client goes away mid-stream; the server must cancel and go on
        return response.status_code, None


def _trickle(url: str, timeout_s: float) -> tuple[int, str | None]:
    """Headers, then a byte every 0.25 s: the server must answer 408 after body_timeout_s."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s + 10) as raw:
        raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n{")
        raw.settimeout(0.25)
        answer, deadline = b"", time.monotonic() + timeout_s + 10
        while time.monotonic() < deadline and b"\r\n\r\n" not in answer:
            try:
                chunk = raw.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                raw.sendall(b" ")
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, "request_timeout" if status == 408 else None


def _trickle_headers(url: str, timeout_s: float) -> tuple[int, str | None]:
    """Half a request line, then a byte every 0.25 s that never ends the headers: the server must hang up."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s + 10) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + timeout_s + 10
        try:
            while time.monotonic() < deadline:
                raw.sendall(b"a")
                raw.settimeout(0.25)
                try:
                    if raw.recv(65536) == b"":
                        return 0, "closed"
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            return 0, "closed"
    return 0, "still open"


def _image_chat(raw: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    return {"model": CHARACTER, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}]}]}


Kind = tuple[str, int, "str | None", Callable[[httpx.Client, str], tuple[int, "str | None"]]]


def request_kinds() -> list[Kind]:
    """(name, expected status, expected error code, send) of every request the soak makes, in rotation."""
    over_body = b'{"messages": "' + b"x" * (LIMITS["max_body_bytes"] + 10) + b'"}'
    huge_text = _chat("word " * (LIMITS["max_text_bytes"] // 4))  # over max_text_bytes, under max_body_bytes
    return [
        ("chat", 200, None, lambda c, u: _json_post(c, u, "/v1/chat/completions", _chat())),
        ("stream", 200, None, lambda c, u: _stream(c, u, drop_after_first=False)),
        ("stream_dropped", 200, None, lambda c, u: _stream(c, u, drop_after_first=True)),
        ("text_completion", 200, None, lambda c, u: _json_post(c, u, "/v1/completions",
                                                               {"prompt": "Once upon", "max_tokens": 6})),
        ("bad_json", 400, "invalid_json", lambda c, u: _json_post(c, u, "/v1/chat/completions", b'{"messages": [')),
        ("string_max_tokens", 400, "invalid_value",
         lambda c, u: _json_post(c, u, "/v1/chat/completions", _chat(max_tokens="10"))),
        ("lone_surrogate", 400, "invalid_value",
         lambda c, u: _json_post(c, u, "/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}')),
        ("bad_image", 400, "invalid_image",
         lambda c, u: _json_post(c, u, "/v1/chat/completions", _image_chat(b"%!PS-Adobe-3.0 EPSF-3.0\n"))),
        ("unknown_route", 404, "unknown_url", lambda c, u: _get(c, u, "/v1/nope")),
        ("over_body", 413, "body_too_large", lambda c, u: _json_post(c, u, "/v1/chat/completions", over_body)),
        ("huge_text", 413, "text_too_large", lambda c, u: _json_post(c, u, "/v1/chat/completions", huge_text)),
        ("chat_again", 200, None, lambda c, u: _json_post(c, u, "/v1/chat/completions", _chat("Bonjour!"))),
    ]


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class SoakReport:
    """What a soak saw: requests by kind and status class, every unexpected answer, /health and RSS figures."""

    requests: int = 0
    seconds: float = 0.0
    by_class: collections.Counter = field(default_factory=collections.Counter)
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    unexpected: list[str] = field(default_factory=list)
    health_checks: int = 0
    health_max_s: float = 0.0
    health_failures: int = 0
    rss_mib: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "seconds": round(self.seconds, 1), "by_class": dict(self.by_class),
                "by_kind": dict(self.by_kind), "unexpected": self.unexpected[:50], "health_checks": self.health_checks,
                "health_max_s": round(self.health_max_s, 3), "health_failures": self.health_failures,
                "rss_mib": {k: round(v, 1) for k, v in self.rss_mib.items()}}


class Soak:
    """Drive a running server at URL (process PID, for RSS) with the request mix; see the module docstring."""

    def __init__(self, url: str, pid: int, requests: int, seconds: float, clients: int = 4,
                 trickle_every: int = 50) -> None:
        self.url, self.pid, self.total, self.seconds = url, pid, requests, seconds
        self.clients, self.trickle_every = clients, trickle_every
        self.report = SoakReport()
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._stop = threading.Event()

    def run(self) -> SoakReport:
        kinds, started = request_kinds(), time.monotonic()
        self.report.rss_mib["start"] = rss_mib(self.pid)
        self._deadline = started + self.seconds
        watcher = threading.Thread(target=self._watch_health, daemon=True)
        watcher.start()
        workers = [threading.Thread(target=self._work, args=(kinds,), daemon=True) for _ in range(self.clients)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        self._stop.set()
        watcher.join(5)
        self.report.rss_mib["end"] = rss_mib(self.pid)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _take(self) -> int | None:
        number = next(self._next)
        if number >= self.total or time.monotonic() > self._deadline:
            return None
        if number == self.total // 2:
            self.report.rss_mib["middle"] = rss_mib(self.pid)
        return number

    def _work(self, kinds: list[Kind]) -> None:
        with httpx.Client(timeout=60) as client:  # one keep-alive connection per client, errors included
            while (number := self._take()) is not None:
                if self.trickle_every and number % self.trickle_every == self.trickle_every - 1:
                    name, status, code = "slow_body", 408, "request_timeout"
                    got = _trickle(self.url, LIMITS["body_timeout_s"])
                elif self.trickle_every and number % self.trickle_every == self.trickle_every // 2:
                    name, status, code = "slow_headers", 0, "closed"  # no answer: the server hangs up
                    got = _trickle_headers(self.url, LIMITS["header_timeout_s"])
                else:
                    name, status, code, send = kinds[number % len(kinds)]
                    try:
                        got = send(client, self.url)
                    except httpx.HTTPError as error:
                        got = (0, f"{type(error).__name__}: {error}")
                self._record(name, (status, code), got)

    def _record(self, name: str, expected: tuple[int, str | None], got: tuple[int, str | None]) -> None:
        with self._lock:
            self.report.requests += 1
            self.report.by_kind[name] += 1
            answered = f"{got[0] // 100}xx" if got[0] else "closed by the server" if got[1] == "closed" else "no answer"
            self.report.by_class[answered] += 1
            if got[0] != expected[0] or (expected[1] is not None and got[1] != expected[1]):
                self.report.unexpected.append(f"{name}: expected {expected}, got {got}")

    def _watch_health(self) -> None:
        with httpx.Client(timeout=10) as health:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = health.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with self._lock:
                    self.report.health_checks += 1
                    self.report.health_max_s = max(self.report.health_max_s, elapsed)
                    self.report.health_failures += not ok
                self._stop.wait(0.1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(run: Path, port: int, timeout_s: float = 120) -> subprocess.Popen:
    """`personae serve RUN` with the soak's limits on 127.0.0.1:PORT, once /health answers."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in LIMITS.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "personae", "serve", str(run), "--port", str(port),
                                "--torch-threads", "1", *flags], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"personae serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"personae serve did not answer /health on port {port} within {timeout_s} s")


def soak(run: Path, requests: int, seconds: float, clients: int = 4) -> dict[str, Any]:
    """Start a server for RUN, soak it, stop it; the report as a dict."""
    port = free_port()
    process = start_server(run, port)
    try:
        url = f"http://127.0.0.1:{port}"
        httpx.post(url + "/v1/chat/completions", json=_chat(), timeout=60)  # warm up before the first RSS
        report = Soak(url, process.pid, requests, seconds, clients).run().as_dict()
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    report["server_exit_code"] = process.returncode
    return report


def huge_requests(run: Path, text_bytes: int, history: bool = False, count: int = 3,
                  limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """COUNT simultaneous chats of TEXT_BYTES of text (one message, or a chat of 8 KB turns) against a fresh
    server with LIMITS (default: the server's own defaults); their statuses, /health's worst latency, RSS."""
    global LIMITS
    saved, LIMITS = LIMITS, dict(limits or {})
    port = free_port()
    try:
        process = start_server(run, port)
    finally:
        LIMITS = saved
    url, latencies, statuses, peak = f"http://127.0.0.1:{port}", [], [], [0.0]
    if history:
        turns = [{"role": role, "content": "Bonjour, chef! " * 533} for _ in range(text_bytes // 16000)
                 for role in ("user", "assistant")]
        body = json.dumps({"model": CHARACTER, "max_tokens": 8, "messages": turns + [{"role": "user", "content": "hi"}]})
    else:
        body = json.dumps(_chat("word " * (text_bytes // 5)))
    try:
        httpx.post(url + "/v1/chat/completions", json=_chat(), timeout=60)
        before, done = rss_mib(process.pid), threading.Event()

        def watch() -> None:
            with httpx.Client(timeout=300) as client:
                while not done.is_set():
                    start = time.perf_counter()
                    client.get(url + "/health")
                    latencies.append(time.perf_counter() - start)
                    peak[0] = max(peak[0], rss_mib(process.pid))
                    time.sleep(0.05)

        def send() -> None:
            statuses.append(httpx.post(url + "/v1/chat/completions", content=body, timeout=300,
                                       headers={"Content-Type": "application/json"}).status_code)

        watcher, started = threading.Thread(target=watch), time.perf_counter()
        watcher.start()
        senders = [threading.Thread(target=send) for _ in range(count)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
        return {"statuses": sorted(statuses), "seconds": round(seconds, 2), "health_max_s": round(max(latencies), 3),
                "rss_before_mib": round(before), "rss_peak_mib": round(max(peak[0], before)),
                "rss_after_mib": round(rss_mib(process.pid))}
    finally:
        process.terminate()
        process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a fine-tuned run with the chef-baptiste character")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--huge", type=int, default=None, metavar="BYTES",
                        help="instead: three simultaneous chats of BYTES of text at the server's default limits")
    parser.add_argument("--history", action="store_true", help="with --huge: the text as a chat of 8 KB turns")
    parser.add_argument("--max-text-bytes", type=int, default=None, help="with --huge: the server's text limit")
    args = parser.parse_args()
    if args.huge is not None:
        limits = {} if args.max_text_bytes is None else {"max_text_bytes": args.max_text_bytes}
        print(json.dumps(huge_requests(args.run, args.huge, args.history, limits=limits)))
        return
    print(json.dumps(soak(args.run, args.requests, args.seconds, args.clients), indent=1))


if __name__ == "__main__":
    main()
