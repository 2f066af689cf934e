"""The scheduler on the generation engine: the same tokens as a lone `generate` when batched, joining
mid-way, compacted or prefix-cached; admission, cancellation and a full queue."""

from __future__ import annotations

import asyncio

import pytest
import torch

from personae.config import apply_overrides
from personae.models.generation import SamplingParams, generate
from personae.models.model import PersonaeModel
from personae.serve.app import RunBundle
from personae.serve.scheduler import Done, Failed, GenerationJob, QueueFull, Scheduler, SchedulerStopped
from tests.conftest import micro_config


def random_model(bundle: RunBundle, *overrides: str) -> PersonaeModel:
    cfg = apply_overrides(micro_config(), ["model.decoder.enabled=true", *overrides])
    cfg.model.text.vocab_size = bundle.tokenizer.vocab_size
    torch.manual_seed(0)
    model = PersonaeModel(cfg.model).eval()
    for block in model.decoder.blocks if cfg.model.decoder.shift else ():  # make the shift weigh in: a wrong slot shows
        torch.nn.init.normal_(block.attn.shift_mix, std=0.7)
    return model


# the micro config inherits the tiny preset's token shift: "plain" turns it off
VARIANTS = {"plain": ["model.decoder.shift=0"], "shift": ["model.decoder.shift=2"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def short_model(bundle: RunBundle, request) -> PersonaeModel:
    """A random micro model whose decoder has only 48 positions, so that the cache must compact
    (plain, and with a token shift, whose previous projections ride in the cache per row)."""
    return random_model(bundle, "model.decoder.max_len=48", *VARIANTS[request.param])


def prompts(bundle: RunBundle) -> list[list[int]]:
    texts = ["what do you see", "a red ball on the table, and a cat", "hello"]
    return [bundle.tokenizer.encode(t, add_cls=False, add_eos=False) for t in texts]


def pixels(model: PersonaeModel, count: int) -> torch.Tensor:
    size = model.cfg.vision.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def reference(model: PersonaeModel, bundle: RunBundle, prompt: list[int], image: torch.Tensor | None,
              params: SamplingParams) -> list[int]:
    """What the library generates for one prompt alone."""
    batch_image = image[None] if image is not None else None
    return generate(model, bundle.tokenizer, [prompt], batch_image, params)[0].token_ids


def run_until_idle(scheduler: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if not scheduler.run_once():
            return
    raise AssertionError("the scheduler did not finish")


def result(handle) -> list:
    return handle.result_blocking(timeout=5)


@pytest.mark.parametrize("max_repeats", [0, 2])
def test_batched_requests_match_generate_alone(bundle: RunBundle, max_repeats: int) -> None:
    model, ids = bundle.model, prompts(bundle)
    images = pixels(model, len(ids))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, max_repeats=max_repeats)
    scheduler = Scheduler(model, bundle.tokenizer, max_batch=8)
    handles = [scheduler.submit(GenerationJob(p, images[i], params)) for i, p in enumerate(ids)]
    handles.append(scheduler.submit(GenerationJob(ids[0], None, params)))  # text-only rows batch too
    run_until_idle(scheduler)
    got = [result(h)[0].token_ids for h in handles]
    expected = [reference(model, bundle, p, images[i], params) for i, p in enumerate(ids)]
    expected.append(reference(model, bundle, ids[0], None, params))
    assert got == expected
    assert scheduler.stats.max_batch_seen == 4 and scheduler.stats.steps == 12


def test_joining_mid_batch_and_compaction_keep_every_reply_exact(short_model: PersonaeModel,
                                                                  bundle: RunBundle) -> None:
    ids, images = prompts(bundle), pixels(short_model, 3)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)
    scheduler = Scheduler(short_model, bundle.tokenizer, max_batch=8)
    first = scheduler.submit(GenerationJob(ids[0], images[0], params))
    for _ in range(4):
        scheduler.run_once()
    second = scheduler.submit(GenerationJob(ids[1], images[1], params, n=2))  # joins a running batch
    for _ in range(3):
        scheduler.run_once()
    third = scheduler.submit(GenerationJob(ids[2], None, params))
    run_until_idle(scheduler)
    assert scheduler.stats.joins_mid_batch == 2
    assert scheduler.batch.compactions >= 1  # the shared slot reached decoder.max_len = 48
    assert result(first)[0].token_ids == reference(short_model, bundle, ids[0], images[0], params)
    seeded = SamplingParams(max_new_tokens=24, temperature=1.0, seed=4)  # choice 1 samples with seed + 1
    assert [g.token_ids for g in result(second)] == [reference(short_model, bundle, ids[1], images[1], params),
                                                     reference(short_model, bundle, ids[1], images[1], seeded)]
    assert result(third)[0].token_ids == reference(short_model, bundle, ids[2], None, params)


def test_cancelled_request_leaves_the_batch_and_others_go_on(bundle: RunBundle) -> None:
    ids, images = prompts(bundle), pixels(bundle.model, 2)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=8)
    # ignore_eos: the kept row is still decoding at the check whatever the trained model would end with
    kept = scheduler.submit(GenerationJob(ids[0], images[0], params, ignore_eos=True))
    dropped = scheduler.submit(GenerationJob(ids[1], images[1], params, ignore_eos=True))
    scheduler.run_once()
    dropped.cancel()
    scheduler.run_once()
    assert len(scheduler.rows) == 1 and scheduler.stats.cancelled == 1
    run_until_idle(scheduler)
    events = [dropped.next_event_blocking(timeout=5)]
    while not isinstance(events[-1], (Done, Failed)):
        events.append(dropped.next_event_blocking(timeout=5))
    assert isinstance(events[-1], Failed) and isinstance(events[-1].error, asyncio.CancelledError)
    alone = Scheduler(bundle.model, bundle.tokenizer, max_batch=8)
    solo = alone.submit(GenerationJob(ids[0], images[0], params, ignore_eos=True))
    run_until_idle(alone)
    kept_ids = result(kept)[0].token_ids
    assert len(kept_ids) == 10 and kept_ids == result(solo)[0].token_ids  # as if it had been alone


def test_full_queue_is_refused_with_a_retry_hint(bundle: RunBundle) -> None:
    scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=2, max_queue=1, retry_after=3)
    job = GenerationJob(prompts(bundle)[0], None, SamplingParams(max_new_tokens=2))
    scheduler.submit(job)
    with pytest.raises(QueueFull, match="max_queue=1") as refused:
        scheduler.submit(job)
    assert refused.value.retry_after == 3 and scheduler.stats.rejected == 1
    with pytest.raises(ValueError, match="n=3"):
        scheduler.submit(GenerationJob(job.prompt_ids, None, job.params, n=3))


def test_batching_off_runs_one_request_at_a_time(bundle: RunBundle) -> None:
    ids = prompts(bundle)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    scheduler = Scheduler(bundle.model, bundle.tokenizer, max_batch=8, batching=False)
    handles = [scheduler.submit(GenerationJob(p, None, params)) for p in ids]
    run_until_idle(scheduler)
    assert scheduler.stats.max_batch_seen == 1
    assert [result(h)[0].token_ids for h in handles] == [reference(bundle.model, bundle, p, None, params) for p in ids]


def test_scheduler_thread_serves_holds_and_stops(bundle: RunBundle) -> None:
    scheduler = Scheduler(bundle.model, bundle.tokenizer).start()
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    first = result(scheduler.submit(GenerationJob(prompts(bundle)[2], None, params)))
    with scheduler.hold():
        waiting = scheduler.submit(GenerationJob(prompts(bundle)[2], None, params))
        assert scheduler.queued == 1
    assert result(waiting)[0].token_ids == first[0].token_ids
    scheduler.stop()
    with pytest.raises(SchedulerStopped):
        scheduler.submit(GenerationJob(prompts(bundle)[2], None, params))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_cached_heads_give_the_same_replies(bundle: RunBundle, variant: str) -> None:
    model = random_model(bundle, *VARIANTS[variant])
    head = bundle.tokenizer.encode("You are a chef in Lyon who loves markets and talks about food", add_cls=False,
                                   add_eos=False)
    tails = prompts(bundle)
    images = pixels(model, 1)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=21)
    scheduler = Scheduler(model, bundle.tokenizer, max_batch=8, prefix_cache_bytes=1 << 24)
    first = scheduler.submit(GenerationJob(head + tails[0], images[0], params, head_len=len(head)))
    run_until_idle(scheduler)  # a miss: the head is computed alone, then stored
    later = [scheduler.submit(GenerationJob(head + tail, images[0], params, head_len=len(head))) for tail in tails]
    run_until_idle(scheduler)  # hits: three rows prefill only their tails, in one forward
    assert (scheduler.batch.prefixes.misses, scheduler.batch.prefixes.hits) == (1, 1)
    expected = [reference(model, bundle, head + tail, images[0], params) for tail in tails]
    assert [result(h)[0].token_ids for h in later] == expected
    assert result(first)[0].token_ids == expected[0]
