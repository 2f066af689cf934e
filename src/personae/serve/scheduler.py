"""The generation scheduler: one thread that decodes every running request together, step by step.

Requests wait in a bounded queue (full -> :class:`QueueFull`, which the app answers with 503 and
``Retry-After``). Between two decoding steps the scheduler admits waiting requests into the
running :class:`~personae.serve.batch.DecodeBatch` (continuous batching: a request does not wait
for the batch to finish), so every step is one forward pass for all rows. A request with
``n > 1`` is n rows with seeds ``seed, seed + 1, ...``, as in :func:`personae.models.sampling.generate`,
so a request gives the same reply alone, batched, or joining a batch mid-way (up to float
rounding of different batch shapes). With ``batching=False`` one request runs at a time (the
benchmark's baseline).

Cancellation (a client went away) is a flag on the :class:`RequestHandle`; the scheduler drops the
request's rows before the next step. Events reach the request's handler through an asyncio queue
(``loop.call_soon_threadsafe``) or, without a loop, a plain thread-safe queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.models.model import PersonaeModel
from personae.models.sampling import (
    Generation,
    SamplingParams,
    apply_repetition_penalty,
    ban_loops,
    choose_tokens,
    stream_piece,
)
from personae.serve.adapters import ServerAdapters
from personae.serve.batch import DecodeBatch, RowInput

log = logging.getLogger(__name__)


class QueueFull(PersonaeError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerStopped(PersonaeError):
    """The server is shutting down and no longer generates."""


@dataclass
class GenerationJob:
    """One request: a prompt, its image (3, S, S) or None, how to sample, and how many choices."""

    prompt_ids: Sequence[int]
    pixel_values: torch.Tensor | None
    params: SamplingParams
    n: int = 1
    ignore_eos: bool = False
    head_len: int = 0  # leading prompt tokens shared by many requests (system + card): prefix-cached
    stream: bool = True  # send Piece and Finished events as they happen; False: only Done (fewer wake-ups)
    adapter: str | None = None  # the character whose LoRA adapter decodes this request (None: the model's own)


@dataclass
class Piece:
    """New text of choice `index`."""

    index: int
    text: str


@dataclass
class Finished:
    """Choice `index` is complete."""

    index: int
    generation: Generation


@dataclass
class Done:
    """Every choice is complete (in index order)."""

    generations: list[Generation]


@dataclass
class Failed:
    """The request failed or was cancelled."""

    error: BaseException


Event = Piece | Finished | Done | Failed


class RequestHandle:
    """A submitted request: its events as they happen, its result, and `cancel()`."""

    def __init__(self, job: GenerationJob, loop: asyncio.AbstractEventLoop | None) -> None:
        self.job, self.loop = job, loop
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.Queue[Event] = queue.Queue()
        self._cancelled = threading.Event()
        self.generations: list[Generation | None] = [None] * job.n

    def cancel(self) -> None:
        """Stop generating for this request (its rows leave the batch before the next step)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Deliver an event from the scheduler thread to whoever waits on this handle."""
        if self._async is not None and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
                self.loop.call_soon_threadsafe(self._async.put_nowait, event)
        else:
            self._sync.put(event)

    async def next_event(self) -> Event:
        """The next event (for handles submitted with an event loop)."""
        assert self._async is not None, "this handle was submitted without an event loop"
        return await self._async.get()

    def next_event_blocking(self, timeout: float | None = None) -> Event:
        """The next event (for handles submitted without a loop); raises queue.Empty on timeout."""
        return self._sync.get(timeout=timeout)

    def result_blocking(self, timeout: float | None = None) -> list[Generation]:
        """Wait for every choice (handles submitted without a loop)."""
        while True:
            event = self.next_event_blocking(timeout)
            if isinstance(event, Done):
                return event.generations
            if isinstance(event, Failed):
                raise event.error


class _RowState:
    """One decoding row: its request, seeded generator, tokens, text and what was already sent."""

    def __init__(self, handle: RequestHandle, index: int, tokenizer: Tokenizer, max_new: int, seed: int) -> None:
        self.handle, self.index, self.tokenizer = handle, index, tokenizer
        self.params, self.max_new = handle.job.params, max_new
        self.generator = torch.Generator().manual_seed(seed)
        self.ids: list[int] = []
        self.text, self.emitted, self.finish = "", 0, ""

    @property
    def key(self) -> tuple:
        """Rows with equal keys are sampled together in one call."""
        p = self.params
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_repeats, self.handle.job.ignore_eos)

    def push(self, token: int) -> None:
        """Record a sampled token: end token, stop string and length end the row.

        The text is decoded only when something reads it every step (a stream or stop strings);
        otherwise once, when the row ends.
        """
        if token == self.tokenizer.eos_id:
            self.finish = "stop"
        else:
            self.ids.append(token)
            if len(self.ids) >= self.max_new:
                self.finish = "length"
        if not (self.finish or self.params.stop or self.handle.job.stream):
            return
        self.text = self.tokenizer.decode(self.ids)
        cut = min((self.text.find(s) for s in self.params.stop if s and s in self.text), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"

    def new_text(self) -> str:
        """Text not yet sent, holding back half a character or what may begin a stop string."""
        piece, self.emitted = stream_piece(self.text, self.emitted, bool(self.finish), self.params.stop)
        return piece

    def generation(self) -> Generation:
        return Generation(text=self.text, token_ids=list(self.ids), finish_reason=self.finish or "length")


@dataclass
class SchedulerStats:
    """Counters of what the scheduler did (read by /stats and the benchmark)."""

    requests: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0
    tokens: int = 0
    row_steps: int = 0  # sum over steps of the batch size: row_steps / steps = mean batch
    max_batch_seen: int = 0
    joins_mid_batch: int = 0


class Scheduler:
    """Admits waiting requests between steps and decodes all running rows with one forward per step."""

    def __init__(self, model: PersonaeModel, tokenizer: Tokenizer, *, max_batch: int = 32, max_queue: int = 64,
                 batching: bool = True, retry_after: int = 1, prefix_cache_bytes: int = 0,
                 adapters: ServerAdapters | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 (got {max_batch}, {max_queue})")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue, self.batching, self.retry_after = max_batch, max_queue, batching, retry_after
        self.batch = DecodeBatch(model, tokenizer.pad_id, prefix_cache_bytes, adapters)
        self.seen = torch.zeros(0, model.cfg.text.vocab_size, dtype=torch.bool)  # (B, V) tokens each row produced
        self.rows: list[_RowState] = []
        self.stats = SchedulerStats()
        self._waiting: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._held = self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- control -----------------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Start the decoding thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="personae-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; waiting and running requests fail with SchedulerStopped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for handle in list(self._waiting) + [r.handle for r in self.rows]:
                handle.emit(Failed(SchedulerStopped("the server is shutting down")))
            self._waiting.clear()
        self.rows = []

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Admit nothing while inside (running rows go on); requests queue up, then join together."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def submit(self, job: GenerationJob, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises QueueFull when max_queue requests already wait."""
        if job.n < 1 or job.n > self.max_batch:
            raise ValueError(f"n={job.n} must be between 1 and the batch size {self.max_batch}")
        handle = RequestHandle(job, loop)
        with self._cond:
            if self._stopping:
                raise SchedulerStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are already waiting "
                                f"(max_queue={self.max_queue}); retry in {self.retry_after} s", self.retry_after)
            self._waiting.append(handle)
            self.stats.requests += 1
            self._cond.notify_all()
        return handle

    @property
    def queued(self) -> int:
        return len(self._waiting)

    # ---- the decoding thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.rows and (self._held or not self._waiting):
                    self._cond.wait()
                if self._stopping:
                    return
            self.run_once()

    def run_once(self) -> bool:
        """Admit the waiting requests that fit, then decode one step; False when there was nothing to do.

        The decoding thread calls this in a loop; tests call it directly on a scheduler that was
        never started, to interleave arrivals and steps deterministically.
        """
        with self._cond:
            admitted = [] if self._held else self._take_admissible()
        try:
            if admitted:
                self._admit(admitted)
            if self.rows:
                self._step()
        except Exception as error:  # a failing step must not take the server down with it
            log.exception("generation step failed; failing the %d running rows", len(self.rows))
            self._fail_all(admitted, error)
        return bool(admitted or self.rows or self._waiting)

    def _take_admissible(self) -> list[RequestHandle]:
        """Pop the waiting requests that fit in the batch now (called with the lock held)."""
        taken: list[RequestHandle] = []
        rows = len(self.rows)
        while self._waiting:
            handle = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()
                self.stats.cancelled += 1
                handle.emit(Failed(asyncio.CancelledError()))
                continue
            if not self.batching and (rows or taken):
                break
            if self.batching and rows + handle.job.n > self.max_batch:
                break
            taken.append(self._waiting.popleft())
            rows += handle.job.n
        return taken

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill the admitted requests' rows and add them to the running batch."""
        inputs, states = [], []
        for handle in handles:
            job = handle.job
            room = self.batch.prompt_room(len(job.prompt_ids), job.pixel_values is not None)
            if room < 1:
                handle.emit(Failed(ValueError(f"a prompt of {len(job.prompt_ids)} tokens leaves no room to reply")))
                continue
            base_seed = job.params.seed if job.params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            for index in range(job.n):
                inputs.append(RowInput(job.prompt_ids, job.pixel_values, job.head_len, job.adapter))
                states.append(_RowState(handle, index, self.tokenizer, min(job.params.max_new_tokens, room),
                                        base_seed + index))
        if not inputs:
            return
        if self.rows:
            self.stats.joins_mid_batch += len(handles)
        headroom = max(s.max_new - len(s.ids) for s in self.rows + states)
        order = self.batch.join(inputs, headroom)
        self.rows += [states[i] for i in order]
        fresh = torch.zeros(len(order), self.seen.shape[1], dtype=torch.bool)
        self.seen = torch.cat([self.seen, fresh])

    def _step(self) -> None:
        """Sample a token for every row, send the new text, drop finished rows, run the next forward."""
        gone = torch.tensor([r.handle.cancelled for r in self.rows])
        tokens = self._choose()
        self.stats.steps += 1
        self.stats.row_steps += len(self.rows)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self.rows))
        for row, token, cancelled in zip(self.rows, tokens.tolist(), gone.tolist()):
            if not cancelled:
                row.push(token)
                self._send(row)
        self.stats.tokens += int((~gone).sum())
        self.seen[torch.arange(len(self.rows)), tokens] = True
        keep = torch.tensor([not (r.finish or g) for r, g in zip(self.rows, gone.tolist())])  # `gone` once: no race
        self._count_cancelled(gone)
        self.rows = [r for r, k in zip(self.rows, keep.tolist()) if k]
        self.seen = self.seen[keep]
        self.batch.keep(keep.to(self.batch.device))
        if self.rows:
            self.batch.step(tokens[keep].to(self.batch.device))

    def _choose(self) -> torch.Tensor:
        """(B,) next tokens on the CPU; rows with the same sampling settings are sampled in one call.

        Sampling runs on the CPU because every row's generator is a CPU generator (its seed must
        give the same reply on any device); moving (B, V) logits is cheap next to a forward pass.
        """
        logits = self.batch.logits.float().cpu()
        tokens = torch.zeros(len(self.rows), dtype=torch.long)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(row.key, []).append(i)
        for key, members in groups.items():
            index = torch.tensor(members)
            group_logits = logits[index]
            if key[-1]:  # ignore_eos: the end token is never sampled
                group_logits[:, self.tokenizer.eos_id] = float("-inf")
            params = self.rows[members[0]].params
            group_logits = apply_repetition_penalty(group_logits, self.seen[index], params.repetition_penalty)
            group_logits = ban_loops(group_logits, [self.rows[i].ids for i in members], params.max_repeats)
            tokens[index] = choose_tokens(group_logits, params, [self.rows[i].generator for i in members])
        return tokens

    def _send(self, row: _RowState) -> None:
        """Emit the row's new text; when it ends, its Finished event (and Done after the last choice)."""
        stream = row.handle.job.stream
        piece = row.new_text() if stream else ""
        if piece:
            row.handle.emit(Piece(row.index, piece))
        if row.finish:
            generation = row.generation()
            row.handle.generations[row.index] = generation
            if stream:
                row.handle.emit(Finished(row.index, generation))
            if all(g is not None for g in row.handle.generations):
                row.handle.emit(Done([g for g in row.handle.generations if g is not None]))

    def _count_cancelled(self, gone: torch.Tensor) -> None:
        """Tell each cancelled request (once) that it is over."""
        handles = {id(r.handle): r.handle for r, g in zip(self.rows, gone.tolist()) if g}
        for handle in handles.values():
            self.stats.cancelled += 1
            handle.emit(Failed(asyncio.CancelledError()))

    def _fail_all(self, admitted: list[RequestHandle], error: Exception) -> None:
        """Fail every running row (and the requests being admitted) and start from an empty batch."""
        handles = {id(h): h for h in admitted + [r.handle for r in self.rows]}
        for handle in handles.values():
            handle.emit(Failed(error))
        self.stats.failed += len(handles)
        self.rows = []
        self.seen = self.seen[:0]
        self.batch.clear()
