"""Meta-learning episodes: a task is one character, with a support set of k and a disjoint query set of q.

Training: :class:`EpisodeSampler` groups conversations by character and draws, for meta-batch
step ``s``, ``n`` distinct characters and for each ``k + q`` distinct conversations, split into
support and query. Every draw is a pure function of ``(seed, step)``: the same step gives the same
episodes in any process, whatever was drawn before (resume and DDP ranks need no sampler state).

Evaluation: :func:`heldout_episodes` gives each held-out character a support set from its example
file (``characters/<id>.examples.jsonl``, the first k rows, so the k = 1 set is inside the k = 5
one) or from a split, and a query set from its test conversations.

Episodes hold indices into one pool of records; :class:`EpisodeCollator` turns them into batches
for ``RolePlayTask`` through a ``RolePlayDataset`` built over that same pool.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from personae.data.dialogues import DialogueRecord, read_dialogues
from personae.data.labels import IGNORE_INDEX
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.errors import DataError

EXAMPLES_SUFFIX = ".examples.jsonl"


@dataclass(frozen=True)
class Episode:
    """One task: a character, and the pool indices of its support and query conversations."""

    character: str
    support: tuple[int, ...]
    query: tuple[int, ...]


def group_by_character(records: Sequence[DialogueRecord]) -> dict[str, list[int]]:
    """Pool indices of each character's conversations, characters in sorted order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[record.character].append(index)
    return {name: groups[name] for name in sorted(groups)}


def _check_sizes(k: int, q: int) -> None:
    if k < 1 or q < 0:
        raise ValueError(f"episodes need k >= 1 support and q >= 0 query conversations, got k={k}, q={q}")


class EpisodeSampler:
    """Deterministic support/query episodes over the characters of a pool of conversations."""

    def __init__(self, records: Sequence[DialogueRecord], *, k: int, q: int, seed: int = 0) -> None:
        _check_sizes(k, q)
        self.records, self.k, self.q, self.seed = list(records), k, q, seed
        self.groups = group_by_character(self.records)
        if not self.groups:
            raise DataError("no conversations to draw episodes from (check the split and character filters)")
        short = {name: len(rows) for name, rows in self.groups.items() if len(rows) < k + q}
        if short:
            listed = ", ".join(f"{name} ({count})" for name, count in list(short.items())[:5])
            raise DataError(f"{len(short)} character(s) have fewer than k + q = {k + q} conversations: {listed}; "
                            "lower meta.support / meta.query or drop these characters")
        self.characters = list(self.groups)

    def episode(self, character: str, step: int) -> Episode:
        """The episode of `character` at meta-batch `step`: k support and q query, disjoint."""
        if character not in self.groups:
            raise KeyError(f"unknown character {character!r}; known: {', '.join(self.characters[:8])}...")
        rows = self.groups[character]
        rng = np.random.default_rng([self.seed, step, self.characters.index(character)])
        picked = [rows[i] for i in rng.choice(len(rows), size=self.k + self.q, replace=False)]
        return Episode(character, tuple(picked[: self.k]), tuple(picked[self.k:]))

    def meta_batch(self, step: int, n: int) -> list[Episode]:
        """n episodes of n distinct characters for meta-batch `step`."""
        if not 1 <= n <= len(self.characters):
            raise ValueError(f"a meta-batch of {n} tasks needs 1..{len(self.characters)} characters "
                             f"(the pool has {len(self.characters)})")
        rng = np.random.default_rng([self.seed, step])
        chosen = sorted(rng.choice(len(self.characters), size=n, replace=False))
        return [self.episode(self.characters[i], step) for i in chosen]


def examples_file(characters_dir: str | Path, character: str) -> Path:
    """Where a character's adaptation examples live: characters/<id>.examples.jsonl."""
    return Path(characters_dir) / f"{character}{EXAMPLES_SUFFIX}"


def _support_records(data_dir: Path, character: str, k: int, support_split: str | None,
                     pool: list[DialogueRecord], seed: int, salt: int) -> list[DialogueRecord]:
    if support_split is None:
        path = examples_file(data_dir / "characters", character)
        rows = read_dialogues(path)
        if len(rows) < k:
            raise DataError(f"{character} has {len(rows)} example conversations, fewer than k = {k}", path)
        return rows[:k]
    if len(pool) < k:
        raise DataError(f"{character} has {len(pool)} {support_split!r} conversations, fewer than k = {k}",
                        data_dir / "dialogues.jsonl")
    order = np.random.default_rng([seed, salt]).permutation(len(pool))  # the first k: nested over k
    return [pool[i] for i in sorted(order[:k])]


def _query_records(name: str, rows: list[DialogueRecord], support: list[DialogueRecord], q: int | None,
                   seed: int, salt: int, where: Path, split: str) -> list[DialogueRecord]:
    taken = {id(r) for r in support}  # the same split may provide both sets: never share a conversation
    rows = [r for r in rows if id(r) not in taken]
    if not rows or (q is not None and len(rows) < q):
        raise DataError(f"{name} has {len(rows)} {split!r} conversations left for the query set, "
                        f"fewer than {q or 1}", where)
    if q is None:
        return rows
    rng = np.random.default_rng([seed, salt, 1])
    return [rows[i] for i in sorted(rng.choice(len(rows), size=q, replace=False))]


def heldout_episodes(data_dir: str | Path, *, k: int, q: int | None = None, query_split: str = "test",
                     support_split: str | None = None, character_split: str = "heldout", seed: int = 0,
                     characters: Sequence[str] | None = None) -> tuple[list[DialogueRecord], list[Episode]]:
    """Evaluation episodes of the held-out characters: (the pool of records, one episode per character).

    Support: the first k rows of each example file, or k conversations drawn from `support_split`.
    Query: the character's `query_split` conversations (all, or q drawn with the seed), never in support.
    """
    _check_sizes(k, q or 0)
    data_dir = Path(data_dir)
    manifest = data_dir / "dialogues.jsonl"
    splits = {query_split} | ({support_split} if support_split is not None else set())
    by_split = {split: read_dialogues(manifest, split=split, character_split=character_split) for split in splits}
    grouped = {split: group_by_character(rows) for split, rows in by_split.items()}
    names = list(characters) if characters is not None else list(grouped[query_split])
    pool: list[DialogueRecord] = []
    episodes = []
    for salt, name in enumerate(names):
        support_pool = [] if support_split is None else [
            by_split[support_split][i] for i in grouped[support_split].get(name, [])]
        support = _support_records(data_dir, name, k, support_split, support_pool, seed, salt)
        query_rows = [by_split[query_split][i] for i in grouped[query_split].get(name, [])]
        query = _query_records(name, query_rows, support, q, seed, salt, manifest, query_split)
        start = len(pool)
        pool += support + query
        episodes.append(Episode(name, tuple(range(start, start + k)), tuple(range(start + k, len(pool)))))
    return pool, episodes


def pad_values(pad_id: int) -> dict[str, int]:
    """How role-play batches pad when tasks are stacked: pad ids, ignored labels, masked positions."""
    return {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}


class EpisodeCollator:
    """Episodes -> (support, query) batches for RolePlayTask, from a RolePlayDataset over the episodes' pool."""

    def __init__(self, dataset: RolePlayDataset, pad_id: int) -> None:
        self.dataset, self.pad_id = dataset, pad_id

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A collate_roleplay batch of pool rows (empty index lists are an error)."""
        if not indices:
            raise ValueError("an empty support or query set cannot be batched (q = 0?)")
        return collate_roleplay([self.dataset[i] for i in indices], self.pad_id)

    def __call__(self, episode: Episode) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return self.batch(episode.support), self.batch(episode.query)

    def meta_batch(self, episodes: Sequence[Episode]) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """[(support, query), ...]: stack them with personae.meta.stack_tasks(tasks, pad_values(pad_id))."""
        return [self(episode) for episode in episodes]
