"""A run's recommended generation settings, ``RUN/generation_config.json`` (like Hugging Face's file).

Fine-tuning and meta-training write one with the settings evaluation decodes with (greedy, loop
breaking at ``finetune.max_repeats``); the server fills every sampling field a request leaves out
(or sends as null) from it, and ``personae chat`` starts from it. A run without the file gets
:data:`FALLBACK`, the same greedy decoding with loop breaking, never temperature 1 without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from os import PathLike
from pathlib import Path
from typing import Any

from personae.config import Config
from personae.errors import PersonaeError
from personae.files import write_text_atomic
from personae.models.next_token import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """Recommended sampling settings; the fields mirror :class:`~personae.models.next_token.SamplingParams`."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass kept (1: off)
    top_k: int = 0  # most likely tokens kept (0: off)
    min_p: float = 0.0  # drop tokens under min_p times the top one's probability (0: off)
    typical_p: float = 1.0  # locally typical sampling mass (1: off)
    repetition_penalty: float = 1.0  # CTRL-style penalty on generated tokens (1: off)
    frequency_penalty: float = 0.0  # OpenAI's, per time a token was generated
    presence_penalty: float = 0.0  # OpenAI's, once a token was generated
    max_repeats: int = 3  # loop breaking: no n-gram more than this many times in a row (0: off)
    max_new_tokens: int = 64  # reply length when a request names none

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **given: Any) -> dict[str, Any]:
        """These settings with every `given` value that is not None put in their place."""
        values = self.to_json()
        values.update({key: value for key, value in given.items() if value is not None})
        return values


FALLBACK = GenerationDefaults()  # a run without generation_config.json: greedy with loop breaking


def recommended_generation(cfg: Config) -> GenerationDefaults:
    """What evaluation decodes a run of these settings with (greedy, loop breaking at finetune.max_repeats)."""
    return GenerationDefaults(max_repeats=cfg.finetune.max_repeats, max_new_tokens=cfg.finetune.max_new_tokens)


def write_generation_config(run: str | PathLike[str], defaults: GenerationDefaults) -> Path:
    """Write RUN/generation_config.json atomically."""
    return write_text_atomic(Path(run) / GENERATION_CONFIG_FILE, json.dumps(defaults.to_json(), indent=2) + "\n")


def read_generation_config(run: str | PathLike[str], fallback: GenerationDefaults = FALLBACK) -> GenerationDefaults:
    """RUN/generation_config.json, or `fallback` when the run has none (a run older than the file: pass
    recommended_generation(its config)); unknown keys are refused by name."""
    path = Path(run) / GENERATION_CONFIG_FILE
    if not path.exists():
        return fallback
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PersonaeError(f"{path}: not readable JSON ({error})") from None
    known = {f.name: f.type for f in fields(GenerationDefaults)}
    if not isinstance(raw, dict) or set(raw) - set(known):
        extra = sorted(set(raw) - set(known)) if isinstance(raw, dict) else raw
        raise PersonaeError(f"{path}: unknown keys {extra}; valid keys: {', '.join(known)}")
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PersonaeError(f"{path}: {key} must be a number, got {value!r}")
        if known[key] == "int" and float(value) != int(value):
            raise PersonaeError(f"{path}: {key} must be a whole number, got {value!r}")
    defaults = GenerationDefaults(**{k: int(v) if known[k] == "int" else float(v) for k, v in raw.items()})
    try:
        SamplingParams(**{k: v for k, v in defaults.to_json().items()})
    except ValueError as error:
        raise PersonaeError(f"{path}: {error}") from None
    return defaults


__all__ = ["FALLBACK", "GENERATION_CONFIG_FILE", "GenerationDefaults", "read_generation_config",
           "recommended_generation", "write_generation_config"]
