"""The generation scheduler: one thread that decodes every running request together, step by step.

Requests wait in a bounded queue (full -> :class:`QueueFull`, which the app answers with 503 and
``Retry-After``). Between two decoding steps the scheduler admits waiting requests into the
running :class:`~personae.models.generation.DecodeBatch` (continuous batching: a request does not
wait for the batch to finish), so every step is one forward pass for all rows; decoding and token
choice are the engine's, the scheduler keeps admission, cancellation, queueing and events. A request
with ``n > 1`` is n rows with seeds ``seed, seed + 1, ...``, as in :func:`personae.models.generation.generate`,
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
from dataclasses import dataclass, field

import torch

from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.models.generation import DecodeBatch, Generation, Row, RowRequest, SamplingParams
from personae.models.model import PersonaeModel
from personae.models.next_token import TokenLogprob
from personae.serve.adapters import ServerAdapters

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
    """New text of choice `index` (and its tokens' logprobs, when the request asked for them)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
        self.batch = DecodeBatch(model, tokenizer, prefix_cache_bytes=prefix_cache_bytes, adapters=adapters,
                                 max_rows=max_batch if batching else 1)
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
            for handle in list(self._waiting) + list({id(h): h for h in map(_handle, self.rows)}.values()):
                handle.emit(Failed(SchedulerStopped("the server is shutting down")))
            self._waiting.clear()
        self.batch.clear()

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

    def adapters_in_use(self) -> set[str]:
        """The adapter keys of running and queued requests (ServerAdapters evicts none of them)."""
        waiting = {handle.job.adapter for handle in list(self._waiting)}
        return {key for key in waiting | {_handle(row).job.adapter for row in list(self.rows)} if key}

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def rows(self) -> list[Row]:
        """The running rows (each row's request and choice index are its `request.owner`)."""
        return self.batch.rows

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
        requests = []
        for handle in handles:
            job = handle.job
            if self.batch.room(len(job.prompt_ids), job.pixel_values is not None) < 1:
                handle.emit(Failed(ValueError(f"a prompt of {len(job.prompt_ids)} tokens leaves no room to reply")))
                continue
            base_seed = job.params.seed if job.params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            requests += [RowRequest(job.prompt_ids, job.pixel_values, job.params, base_seed + index, job.head_len,
                                    job.adapter, job.ignore_eos, job.stream, owner=(handle, index))
                         for index in range(job.n)]
        if not requests:
            return
        if self.rows:
            self.stats.joins_mid_batch += len(handles)
        self.batch.join(requests)

    def _step(self) -> None:
        """Sample a token for every row, send the new text, drop finished rows, run the next forward."""
        gone = [_handle(row).cancelled for row in self.rows]  # read once: a cancel may land meanwhile
        self.batch.sample()
        self.stats.steps += 1
        self.stats.row_steps += len(self.rows)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self.rows))
        for row, cancelled in zip(self.rows, gone):
            if not cancelled:
                self._send(row)
        self.stats.tokens += len(gone) - sum(gone)
        self._count_cancelled(gone)
        self.batch.leave([not (row.finish or cancelled) for row, cancelled in zip(self.rows, gone)])
        if self.rows:
            self.batch.forward()

    def _send(self, row: Row) -> None:
        """Emit the row's new text; when it ends, its Finished event (and Done after the last choice)."""
        handle, index = row.request.owner  # type: ignore[misc]
        stream = handle.job.stream
        piece = row.new_text() if stream else ""
        logprobs = row.new_logprobs() if stream else []
        if piece or logprobs:
            handle.emit(Piece(index, piece, logprobs))
        if row.finish:
            generation = row.generation()
            handle.generations[index] = generation
            if stream:
                handle.emit(Finished(index, generation))
            if all(g is not None for g in handle.generations):
                handle.emit(Done([g for g in handle.generations if g is not None]))

    def _count_cancelled(self, gone: list[bool]) -> None:
        """Tell each cancelled request (once) that it is over."""
        handles = {id(_handle(r)): _handle(r) for r, g in zip(self.rows, gone) if g}
        for handle in handles.values():
            self.stats.cancelled += 1
            handle.emit(Failed(asyncio.CancelledError()))

    def _fail_all(self, admitted: list[RequestHandle], error: Exception) -> None:
        """Fail every running row (and the requests being admitted) and start from an empty batch."""
        handles = {id(h): h for h in admitted + [_handle(r) for r in self.rows]}
        for handle in handles.values():
            handle.emit(Failed(error))
        self.stats.failed += len(handles)
        self.batch.clear()


def _handle(row: Row) -> RequestHandle:
    """The request a running row belongs to."""
    return row.request.owner[0]  # type: ignore[index]
