"""The label value the losses ignore: prompt positions, padding and unmasked MLM tokens carry it."""

from __future__ import annotations

from collections.abc import Sequence

# -100 is also torch's default `ignore_index` for cross_entropy, so a loss that forgets to pass it
# still skips these positions
IGNORE_INDEX: int = -100


def labelled_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of labelled positions (one per reply, its end-of-reply token last)."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans
