"""The label value the losses ignore: prompt positions, padding and unmasked MLM tokens carry it."""

from __future__ import annotations

# -100 is also torch's default `ignore_index` for cross_entropy, so a loss that forgets to pass it
# still skips these positions
IGNORE_INDEX: int = -100
