"""Token log-probabilities in OpenAI's two response shapes: chat's `logprobs.content[]` and the legacy
completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`.

The values are the log-softmax of the logits after logit bias and penalties (repetition,
frequency, presence, DRY, loop breaking) and before temperature and truncation (top-k, top-p,
min-p, typical-p, XTC): what the model, so steered, thinks of each token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from personae.data.tokenizer import Tokenizer
from personae.models.next_token import TokenLogprob


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text (special tokens by their name)."""
    text = tokenizer.decode([token_id])
    return text if text or token_id not in tokenizer.special_ids else (tokenizer.id_to_token(token_id) or "")


def _entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def _finite(value: float) -> float:
    """JSON has no -inf: a banned token is reported with OpenAI's floor of -9999."""
    return max(value, -9999.0)


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]} for chat completions."""
    content = []
    for entry in entries:
        item = _entry(tokenizer, entry.token_id, entry.logprob)
        item["top_logprobs"] = [_entry(tokenizer, t, lp) for t, lp in entry.top]
        content.append(item)
    return {"content": content}


def legacy_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The /v1/completions shape; text_offset counts characters from `offset` (the echoed prompt's length)."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = token_text(tokenizer, entry.token_id)
        tokens.append(text)
        values.append(_finite(entry.logprob))
        tops.append({token_text(tokenizer, t): _finite(lp) for t, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


__all__ = ["chat_logprobs", "legacy_logprobs", "token_text"]
