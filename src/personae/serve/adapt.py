"""Adaptation jobs: `POST /v1/characters/{id}/adapt` runs an injectable `adapt_fn` in the background.

The hook's signature is ``adapt_fn(task: AdaptTask, progress: Callable[[float, str], None]) ->
CharacterAdapter``: it fits the character from ``task.examples`` and calls ``progress(fraction,
message)`` as it goes; the job then writes the adapter to ``task.adapter_path`` (so it survives a
restart) and hands the tensors to the server (``on_done``). :func:`adapt_in_memory` is the hook
the `personae serve` command plugs in: it adapts the model the server already holds
(:func:`personae.meta.adapt.adapt_to_character`), with no temporary files and no reload. Without
a hook (the default of ``ServeSettings.adapt_fn``), :func:`adaptation_unavailable` raises
:class:`AdaptationUnavailable` and the endpoint answers 501 before starting a job.

Jobs run one at a time on one worker thread (adaptation trains, and must not starve generation
more than one job does); their state is kept in memory and polled with GET. At most ``max_jobs``
are queued or running (one more is :class:`AdaptQueueFull`, a 429), and :meth:`AdaptJobs.cancel`
stops one: a queued job never starts, a running one stops at its next progress report (the hook
reports every step), and no adapter is written for either.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import torch

from personae.config import Config
from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord, DialogueTurn
from personae.data.images import square_pixels
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.meta.adapt import AdaptSpec, CharacterAdapter, adapt_to_character
from personae.models.adapter_files import save_verified_adapter
from personae.models.model import PersonaeModel

log = logging.getLogger(__name__)
AdaptFn = Callable[["AdaptTask", Callable[[float, str], None]], CharacterAdapter]
DEFAULT_STEPS = 10  # inner steps when the request names none (as `personae adapt`)


class AdaptationUnavailable(PersonaeError):
    """This build cannot adapt characters (no adapt_fn was plugged in)."""


class AdaptQueueFull(PersonaeError):
    """As many adaptation jobs as allowed are queued or running already."""


class JobCancelled(PersonaeError):
    """Raised inside a running job's progress report once the job is cancelled: the hook stops there."""


@dataclass
class ServedRun:
    """What the server holds and an in-memory adaptation uses: the model, its config and tokenizer.

    `lock` is the one the decoding thread holds for every forward: the inner loop takes it for
    each of its steps, since torch.func swaps the module's parameters during a call.
    """

    model: PersonaeModel
    config: Config
    tokenizer: Tokenizer
    lock: contextlib.AbstractContextManager
    max_image_pixels: int | None = None  # the uploads' pixel limit (None: the image loader's default)
    learned_lrs: dict[str, torch.Tensor] | None = None  # the run's Meta-SGD rates (read once, at start)


@dataclass
class AdaptTask:
    """What an adaptation needs: the run, the character and its card, the examples, options, the served model."""

    run_dir: Path
    character_id: str
    card: CharacterCard
    examples: list[dict[str, Any]]  # {"user", "reply", "image": data URL or None}
    adapter_path: Path
    options: dict[str, Any] = field(default_factory=dict)  # "steps", "inner_params"
    served: ServedRun | None = None


def adaptation_unavailable(task: AdaptTask, progress: Callable[[float, str], None]) -> CharacterAdapter:
    """The default hook: adaptation is not part of this build."""
    raise AdaptationUnavailable("adaptation is not available in this build: no adapt_fn is configured "
                                "(the meta-learning adapters plug in through ServeSettings.adapt_fn)")


def example_records(task: AdaptTask, image_size: int,
                    max_image_pixels: int | None = None) -> tuple[list[DialogueRecord], torch.Tensor | None]:
    """The API's examples as one-turn conversations, and their images decoded to uint8 (N, 3, S, S)."""
    records = [DialogueRecord(id=f"{task.character_id}-example{number}", character=task.character_id,
                              turns=(DialogueTurn(example["user"], example["reply"]),))
               for number, example in enumerate(task.examples)]
    with_image = [bool(example.get("image")) for example in task.examples]
    if not any(with_image):
        return records, None
    if not all(with_image):
        raise PersonaeError("some examples have an image and some do not: send images with all of them or none")
    limit = {} if max_image_pixels is None else {"max_pixels": max_image_pixels}
    pixels = []
    for number, example in enumerate(task.examples):
        header, _, body = example["image"].partition(",")
        if not header.startswith("data:") or ";base64" not in header:
            raise PersonaeError(f"examples[{number}].image must be a base64 data: URL")
        pixels.append(square_pixels(base64.b64decode(body), image_size, name=f"examples[{number}].image", **limit))
    return records, torch.stack(pixels)


def adapt_in_memory(task: AdaptTask, progress: Callable[[float, str], None]) -> CharacterAdapter:
    """The server's hook: adapt the served model to the task's character (every example is support)."""
    served = task.served
    if served is None:
        raise AdaptationUnavailable("in-memory adaptation needs the served model (AdaptTask.served)")
    cfg = served.config
    records, images = example_records(task, cfg.model.vision.image_size, served.max_image_pixels)
    spec = AdaptSpec.of(cfg, task.options.get("inner_params"))
    return adapt_to_character(served.model, cfg, served.tokenizer, task.card, records,
                              character_id=task.character_id, steps=int(task.options.get("steps") or DEFAULT_STEPS),
                              spec=spec, learned_lrs=served.learned_lrs, images=images,
                              on_progress=progress, step_guard=lambda: served.lock)


@dataclass
class AdaptJob:
    """One job's state as the API reports it."""

    id: str
    character: str
    status: str = "queued"
    progress: float = 0.0
    message: str = "waiting for the adaptation worker"
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    finished: int | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in ("queued", "running")

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "object": "adaptation.job", "character": self.character, "status": self.status,
                "progress": self.progress, "message": self.message, "error": self.error,
                "created": self.created, "finished": self.finished}


class AdaptJobs:
    """Queues adaptation jobs, runs them on one worker thread, and remembers their state."""

    def __init__(self, adapt_fn: AdaptFn | None,
                 on_done: Callable[[AdaptTask, CharacterAdapter], None] | None = None, max_jobs: int = 4) -> None:
        self.adapt_fn: AdaptFn = adapt_fn or adaptation_unavailable
        self.on_done, self.max_jobs = on_done, max_jobs
        self._jobs: dict[str, AdaptJob] = {}
        self._lock = threading.Lock()
        self._queue: Queue[tuple[AdaptJob, AdaptTask] | None] = Queue()
        self._worker: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.adapt_fn is not adaptation_unavailable

    def submit(self, task: AdaptTask) -> AdaptJob:
        """Store the examples beside the uploads and queue the job; raises AdaptationUnavailable, AdaptQueueFull."""
        if not self.available:
            adaptation_unavailable(task, lambda fraction, message: None)
        with self._lock:
            active = sum(job.active for job in self._jobs.values())
        if active >= self.max_jobs:
            raise AdaptQueueFull(f"{active} adaptation jobs are queued or running, the limit (max_adapt_jobs; "
                                 "`personae serve --max-adapt-jobs`); retry when one has finished or cancel one")
        examples = task.run_dir / "uploads" / "examples" / f"{task.character_id}.jsonl"
        examples.parent.mkdir(parents=True, exist_ok=True)
        examples.write_text("".join(json.dumps(e) + "\n" for e in task.examples))
        job = AdaptJob(id=f"adapt-{uuid.uuid4().hex[:16]}", character=task.character_id)
        with self._lock:
            self._jobs[job.id] = job
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="personae-adapt", daemon=True)
                self._worker.start()
        self._queue.put((job, task))
        return job

    def get(self, job_id: str) -> AdaptJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def latest(self, character: str) -> AdaptJob | None:
        """The newest job of a character, or None."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.character == character]
        return jobs[-1] if jobs else None

    def active_for(self, character: str) -> AdaptJob | None:
        """A queued or running job of the character, or None."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.character == character and j.active), None)

    def cancel(self, job_id: str) -> AdaptJob | None:
        """Cancel a queued or running job (a finished one is left as it is); None for an unknown id."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.active:
                job.cancel_requested = True
                if job.status == "queued":  # the worker skips it
                    job.status, job.message, job.finished = "cancelled", "cancelled before it started", int(time.time())
        return job

    def stop(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, task = item
            self._run(job, task)

    def _run(self, job: AdaptJob, task: AdaptTask) -> None:
        def progress(fraction: float, message: str = "") -> None:
            if job.cancel_requested:
                raise JobCancelled(f"adaptation job {job.id} was cancelled")
            job.progress, job.message = max(0.0, min(1.0, float(fraction))), message or job.message

        with self._lock:
            if job.cancel_requested:
                return
            job.status, job.message = "running", "adapting"
        try:
            adapter = self.adapt_fn(task, progress)
            if job.cancel_requested:  # cancelled after its last progress report: nothing is written
                raise JobCancelled(f"adaptation job {job.id} was cancelled")
            save_verified_adapter(task.adapter_path, adapter.tensors, adapter.metadata)  # survives a restart
            if self.on_done is not None:
                self.on_done(task, adapter)
            job.status, job.progress, job.message = "succeeded", 1.0, "adapter written"
        except JobCancelled:
            job.status, job.message = "cancelled", "cancelled while running; no adapter was written"
        except Exception as error:  # the job reports it; the server goes on
            log.exception("adaptation of %s failed", task.character_id)
            job.status, job.error, job.message = "failed", f"{type(error).__name__}: {error}", "failed"
        job.finished = int(time.time())
