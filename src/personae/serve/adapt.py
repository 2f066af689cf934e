"""Adaptation jobs: `POST /v1/characters/{id}/adapt` runs an injectable `adapt_fn` in the background.

The hook's signature is ``adapt_fn(task: AdaptTask, progress: Callable[[float, str], None]) -> Path``:
it fits the character from ``task.examples``, calls ``progress(fraction, message)`` as it goes,
writes ``task.adapter_path`` and returns it. In this build there is no hook: the default,
:func:`adaptation_unavailable`, raises :class:`AdaptationUnavailable` and the endpoint answers 501
before starting a job. The lead plugs the meta-learning `adapt` in through ``ServeSettings.adapt_fn``.

Jobs run one at a time on one worker thread (adaptation trains, and must not starve generation
more than one job does); their state is kept in memory and polled with GET.
"""

from __future__ import annotations

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

from personae.data.cards import CharacterCard
from personae.errors import PersonaeError

log = logging.getLogger(__name__)
AdaptFn = Callable[["AdaptTask", Callable[[float, str], None]], Any]


class AdaptationUnavailable(PersonaeError):
    """This build cannot adapt characters (no adapt_fn was plugged in)."""


@dataclass
class AdaptTask:
    """What an adaptation needs: the run, the character and its card, the examples, and options."""

    run_dir: Path
    character_id: str
    card: CharacterCard
    examples: list[dict[str, Any]]  # {"user", "reply", "image": data URL or None}
    adapter_path: Path
    options: dict[str, Any] = field(default_factory=dict)


def adaptation_unavailable(task: AdaptTask, progress: Callable[[float, str], None]) -> Path:
    """The default hook: adaptation is not part of this build."""
    raise AdaptationUnavailable("adaptation is not available in this build: no adapt_fn is configured "
                                "(the meta-learning adapters plug in through ServeSettings.adapt_fn)")


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

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "object": "adaptation.job", "character": self.character, "status": self.status,
                "progress": self.progress, "message": self.message, "error": self.error,
                "created": self.created, "finished": self.finished}


class AdaptJobs:
    """Queues adaptation jobs, runs them on one worker thread, and remembers their state."""

    def __init__(self, adapt_fn: AdaptFn | None, on_done: Callable[[AdaptTask], None] | None = None) -> None:
        self.adapt_fn: AdaptFn = adapt_fn or adaptation_unavailable
        self.on_done = on_done
        self._jobs: dict[str, AdaptJob] = {}
        self._lock = threading.Lock()
        self._queue: Queue[tuple[AdaptJob, AdaptTask] | None] = Queue()
        self._worker: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.adapt_fn is not adaptation_unavailable

    def submit(self, task: AdaptTask) -> AdaptJob:
        """Store the examples beside the uploads and queue the job; raises AdaptationUnavailable."""
        if not self.available:
            adaptation_unavailable(task, lambda fraction, message: None)
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

    def stop(self) -> None:
        self._queue.put(None)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, task = item
            self._run(job, task)

    def _run(self, job: AdaptJob, task: AdaptTask) -> None:
        def progress(fraction: float, message: str = "") -> None:
            job.progress, job.message = max(0.0, min(1.0, float(fraction))), message or job.message

        job.status, job.message = "running", "adapting"
        try:
            self.adapt_fn(task, progress)
            if self.on_done is not None:
                self.on_done(task)
            job.status, job.progress, job.message = "succeeded", 1.0, "adapter written"
        except Exception as error:  # the job reports it; the server goes on
            log.exception("adaptation of %s failed", task.character_id)
            job.status, job.error, job.message = "failed", f"{type(error).__name__}: {error}", "failed"
        job.finished = int(time.time())
