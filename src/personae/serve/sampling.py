"""The sampling fields chat and text completions share, and how a request's fields become SamplingParams.

Every field a request leaves out or sends as null takes the run's recommended value
(``RUN/generation_config.json``, :mod:`personae.models.generation_config`). Names follow OpenAI
where it has one, else llama.cpp / KoboldCpp as SillyTavern's Text Completion mode sends them.
Samplers personae does not implement (mirostat, tail-free, top-a, smoothing, dynamic temperature,
beam search, min_tokens) are refused with a 400 when set to anything but their neutral value,
never silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from personae.models.generation_config import GenerationDefaults
from personae.models.next_token import DRY_BREAKERS, MAX_TOP_LOGPROBS, SamplingParams
from personae.serve.errors import ApiError
from personae.serve.schemas import SamplerFields

# unimplemented samplers: (field, neutral value); any other value is a 400
UNSUPPORTED_SAMPLERS = (("mirostat", 0), ("mirostat_mode", 0), ("tfs", 1.0), ("tfs_z", 1.0), ("top_a", 0.0),
                        ("smoothing_factor", 0.0), ("dynatemp_range", 0.0), ("dynatemp", False),
                        ("dry_penalty_last_n", -1), ("use_beam_search", False), ("min_tokens", 0))


def check_unsupported(request: BaseModel) -> None:
    """A 400 naming the first unimplemented sampler the request turns on."""
    extra = request.model_extra or {}
    for name, neutral in UNSUPPORTED_SAMPLERS:
        value = extra.get(name)
        if value is not None and value != neutral:
            raise ApiError(400, f"{name}={value!r} is not supported by this server (supported samplers: "
                                "temperature, top_k, top_p, min_p, typical_p, repetition_penalty, frequency_penalty, "
                                "presence_penalty, logit_bias, DRY, XTC)", param=name, code="unsupported_sampler")


MAX_STOP_CHARS = 100  # the longest stop string a request may send


def stop_strings(stop: str | Sequence[str] | None, max_stop: int) -> list[str]:
    """A request's `stop` (one string or a list) as a list, within the server's limits (400s name the field)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > max_stop:
        raise ApiError(400, f"{len(stops)} stop strings is over the limit of {max_stop}", param="stop",
                       code="too_many_stop_strings")
    if any(not text or len(text) > MAX_STOP_CHARS for text in stops):
        raise ApiError(400, f"every stop string must have 1 to {MAX_STOP_CHARS} characters", param="stop",
                       code="invalid_value")
    return stops


def sampling_params(request: SamplerFields, defaults: GenerationDefaults, vocab_size: int, *, max_tokens: int,
                    stop: Sequence[str], seed: int | None, logprobs: bool = False,
                    top_logprobs: int = 0) -> SamplingParams:
    """The request's sampling settings over the run's defaults, checked (400s name the field)."""
    check_unsupported(request)
    values = defaults.with_overrides(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                                     min_p=request.min_p, typical_p=request.typical_p,
                                     repetition_penalty=request.repetition_penalty,
                                     frequency_penalty=request.frequency_penalty,
                                     presence_penalty=request.presence_penalty, max_repeats=request.max_repeats)
    values.pop("max_new_tokens")
    values["top_p"] = max(values["top_p"], 1e-9)  # top_p 0: only the most likely token survives
    values["top_k"] = max(values["top_k"], 0)
    extra: dict[str, Any] = {key: getattr(request, key) for key in ("dry_multiplier", "dry_base", "dry_allowed_length",
                                                                    "xtc_threshold", "xtc_probability")
                             if getattr(request, key) is not None}
    if request.dry_sequence_breakers is not None:
        extra["dry_sequence_breakers"] = _breakers(request.dry_sequence_breakers)
    if top_logprobs > MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs={top_logprobs} is over the limit of {MAX_TOP_LOGPROBS}",
                       param="top_logprobs", code="invalid_value")
    try:
        return SamplingParams(max_new_tokens=max_tokens, stop=list(stop), seed=seed, logprobs=logprobs,
                              top_logprobs=top_logprobs, logit_bias=_logit_bias(request.logit_bias, vocab_size),
                              **values, **extra)
    except ValueError as error:
        raise ApiError(400, str(error).split(" (got ")[0], code="invalid_value") from None


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """OpenAI's {"token id": bias}; ids must be in the vocabulary, biases in [-100, 100]."""
    bias: dict[int, float] = {}
    for key, value in (raw or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})", param="logit_bias",
                           code="invalid_value")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias[{key}]={value} is outside [-100, 100]", param="logit_bias",
                           code="invalid_value")
        bias[int(key)] = float(value)
    return bias


def _breakers(raw: list[str] | str) -> list[str]:
    """DRY's sequence breakers: a list, or (as SillyTavern sends it to some backends) its JSON text."""
    if isinstance(raw, list):
        return raw
    try:
        parsed = json.loads(raw) if raw.strip() else list(DRY_BREAKERS)
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(b, str) for b in parsed):
        raise ApiError(400, "dry_sequence_breakers must be a list of strings (or its JSON text)",
                       param="dry_sequence_breakers", code="invalid_value")
    return parsed


__all__ = ["UNSUPPORTED_SAMPLERS", "check_unsupported", "sampling_params"]
