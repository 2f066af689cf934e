"""Episodes over characters: disjoint support and query sets, deterministic draws, batches for RolePlayTask."""

from __future__ import annotations

import pytest
import torch

from personae.data.dialogues import load_character_cards, read_dialogues
from personae.data.episodes import Episode, EpisodeCollator, EpisodeSampler, examples_file, heldout_episodes, pad_values
from personae.data.roleplay import RolePlayDataset
from personae.data.tokenizer import train_tokenizer
from personae.errors import DataError
from personae.meta import MetaCfg, build_meta, stack_tasks
from personae.models.model import PersonaeModel
from personae.tasks import RolePlayTask
from tests.conftest import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_records(small_world):
    return read_dialogues(small_world / "dialogues.jsonl", split="train", character_split="train")


def test_support_and_query_are_disjoint_and_deterministic(train_records):
    sampler = EpisodeSampler(train_records, k=2, q=1, seed=7)
    batch = sampler.meta_batch(step=3, n=4)
    assert len({e.character for e in batch}) == 4
    for episode in batch:
        assert len(episode.support) == 2 and len(episode.query) == 1
        assert not set(episode.support) & set(episode.query)
        assert {train_records[i].character for i in episode.support + episode.query} == {episode.character}
    again = EpisodeSampler(train_records, k=2, q=1, seed=7)
    assert again.meta_batch(step=3, n=4) == batch  # a pure function of (seed, step)
    assert sampler.meta_batch(step=4, n=4) != batch
    assert EpisodeSampler(train_records, k=2, q=1, seed=8).meta_batch(step=3, n=4) != batch


def test_too_few_conversations_is_a_clear_error(train_records):
    counts = {c: sum(r.character == c for r in train_records) for c in {r.character for r in train_records}}
    smallest = min(counts.values())
    with pytest.raises(DataError, match=rf"fewer than k \+ q = {smallest + 1} conversations: .*\({smallest}\)"):
        EpisodeSampler(train_records, k=smallest, q=1)
    sampler = EpisodeSampler(train_records, k=1, q=1)
    with pytest.raises(ValueError, match="needs 1..32 characters"):
        sampler.meta_batch(step=0, n=33)
    with pytest.raises(ValueError, match="k >= 1"):
        EpisodeSampler(train_records, k=0, q=1)


def test_heldout_episodes_take_support_from_examples_and_query_from_test(small_world):
    pool, episodes = heldout_episodes(small_world, k=3)
    assert episodes and all(pool[i].split == "train" for e in episodes for i in e.support)
    for episode in episodes:
        support = [pool[i] for i in episode.support]
        expected = read_dialogues(examples_file(small_world / "characters", episode.character))[:3]
        assert [r.id for r in support] == [r.id for r in expected]
        assert all(pool[i].split == "test" and pool[i].character == episode.character for i in episode.query)
    pool1, smaller = heldout_episodes(small_world, k=1)  # the k = 1 support set is inside the k = 3 one
    assert [pool1[e.support[0]].id for e in smaller] == [pool[e.support[0]].id for e in episodes]
    pool2, from_split = heldout_episodes(small_world, k=1, support_split="test", q=None, query_split="test",
                                         characters=[e.character for e in episodes if len(e.query) >= 2])
    for episode in from_split:
        assert not {pool2[i].id for i in episode.support} & {pool2[i].id for i in episode.query}
    with pytest.raises(DataError, match="fewer than k = 11"):
        heldout_episodes(small_world, k=11)


def test_episode_batches_feed_role_play_task_and_meta_learning(small_world, train_records):
    sampler = EpisodeSampler(train_records, k=2, q=1, seed=0)
    episodes = sampler.meta_batch(step=0, n=2)
    used = sorted({i for e in episodes for i in e.support + e.query})
    texts = [p.read_text() for p in (small_world / "characters").glob("*.json")]
    tokenizer = train_tokenizer(texts + (small_world / "dialogues.jsonl").read_text().splitlines(), vocab_size=800)
    cfg = micro_config("model.decoder.enabled=true", f"model.text.vocab_size={tokenizer.vocab_size}",
                       "model.decoder.max_len=640").model
    torch.manual_seed(0)
    model = PersonaeModel(cfg).eval()
    subset = [train_records[i] for i in used]  # the pool need not be every record: re-index the episodes
    remap = {old: new for new, old in enumerate(used)}
    dataset = RolePlayDataset(subset, load_character_cards(small_world / "characters"), tokenizer,
                              image_size=32, max_tokens=model.text_budget(0), include_examples=False,
                              progress=False)
    collator = EpisodeCollator(dataset, tokenizer.pad_id)
    tasks = collator.meta_batch([Episode(e.character, tuple(remap[i] for i in e.support),
                                         tuple(remap[i] for i in e.query)) for e in episodes])
    support, query = tasks[0]
    assert support["input_ids"].shape[0] == 2 and query["pixel_values"].shape == (1, 3, 32, 32)
    role_play = RolePlayTask(model, micro_config().finetune)
    assert torch.isfinite(role_play(support)["loss"])
    stacked = stack_tasks(tasks, pad_values(tokenizer.pad_id))
    assert stacked.support["input_ids"].shape[:2] == (2, 2)
    learner = build_meta(role_play, MetaCfg(algo="anil", inner_steps=1, inner_lr=0.1, vmap="off"),
                         head=("model.decoder.ln_f",))
    learner.meta_loss(tasks).backward()  # RolePlayTask's loss has data-dependent shapes: the loop runs it
    assert model.decoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
