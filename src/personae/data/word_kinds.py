"""Kinds of reply words (object names, numbers, ...) by the phrases a data kind names, per token."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from personae.data.labels import labelled_spans
from personae.data.tokenizer import Tokenizer

OTHER = "other"  # reply tokens of no named kind


class WordKinds:
    """Classifies a reply's tokens by the phrases of each kind (the longest phrase at a place wins)."""

    def __init__(self, kinds: Mapping[str, Sequence[str]]) -> None:
        self.names = tuple(kinds)
        owner: dict[str, str] = {}
        for kind, phrases in kinds.items():
            for phrase in phrases:
                owner.setdefault(phrase.lower(), kind)
        self.owner = owner
        ordered = sorted(owner, key=len, reverse=True)
        self.pattern = (re.compile(r"(?<![a-z0-9])(" + "|".join(map(re.escape, ordered)) + r")(?![a-z0-9])")
                        if ordered else None)

    def of_tokens(self, tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
        """The kind of each token of IDS (a reply's text tokens): that of the first named character it covers."""
        if self.pattern is None:
            return [OTHER] * len(ids)
        text = tokenizer.decode(ids, skip_special=False).lower().replace("\u2019", "'")
        at: list[str | None] = [None] * len(text)
        for match in self.pattern.finditer(text):
            at[match.start() : match.end()] = [self.owner[match.group(1)]] * (match.end() - match.start())
        kinds, start = [], 0
        for i in range(len(ids)):  # each token's characters: the growth of the decoded prefix
            end = len(tokenizer.decode(ids[: i + 1], skip_special=False))
            named = [at[c] for c in range(start, min(end, len(at))) if at[c] is not None and not text[c].isspace()]
            kinds.append(named[0] if named else OTHER)
            start = end
        return kinds


@dataclass(frozen=True)
class ContentWeighting:
    """finetune.content_weight: reply tokens of the content kinds weigh `weight` in the reply loss, the rest 1."""

    words: WordKinds
    kinds: frozenset[str]  # e.g. object names, numbers, yes/no, positions (DataKind.content_kinds)
    weight: float

    def label_weights(self, tokenizer: Tokenizer, labels: Sequence[int]) -> list[float]:
        """Per position of a prompt: 0 where unlabelled, `weight` on content reply tokens, 1 on other ones."""
        weights = [0.0] * len(labels)
        for start, end in labelled_spans(labels):
            reply = list(labels[start : end - 1])  # the last labelled token ends the reply
            kinds = self.words.of_tokens(tokenizer, reply)
            weights[start:end] = [self.weight if kind in self.kinds else 1.0 for kind in kinds] + [1.0]
        return weights


__all__ = ["OTHER", "ContentWeighting", "WordKinds"]
