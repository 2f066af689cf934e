"""RUN/generation_config.json: written and read back, the greedy fallback, and errors that name the key."""

import json

import pytest

from personae.errors import PersonaeError
from personae.models.generation_config import (
    FALLBACK,
    GenerationDefaults,
    read_generation_config,
    write_generation_config,
)


def test_round_trip_and_fallback(tmp_path):
    assert read_generation_config(tmp_path) == FALLBACK
    assert FALLBACK.temperature == 0.0 and FALLBACK.max_repeats > 0  # greedy with loop breaking, not word salad
    written = GenerationDefaults(temperature=0.7, top_p=0.9, max_repeats=2, max_new_tokens=80)
    path = write_generation_config(tmp_path, written)
    assert path.name == "generation_config.json" and json.loads(path.read_text())["top_p"] == 0.9
    assert read_generation_config(tmp_path) == written


def test_overrides_keep_the_run_settings_for_what_is_left_out():
    defaults = GenerationDefaults(temperature=0.0, max_repeats=3)
    merged = defaults.with_overrides(temperature=0.8, top_p=None, max_repeats=None)
    assert merged["temperature"] == 0.8 and merged["top_p"] == 1.0 and merged["max_repeats"] == 3


@pytest.mark.parametrize("content, message", [
    ({"temprature": 0.5}, "unknown keys \\['temprature'\\]"),
    ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"top_p": "high"}, "top_p must be a number"),
    ({"top_p": 0}, "top_p must be in \\(0, 1\\]"),
])
def test_bad_files_are_refused_by_key(tmp_path, content, message):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(PersonaeError, match=message):
        read_generation_config(tmp_path)


def test_chat_starts_from_the_run_file_and_the_options_win(tmp_path):
    from personae.app.commands import chat_params
    from personae.config import load_preset

    cfg = load_preset("tiny")
    cfg.finetune.max_repeats = 5
    older = chat_params(tmp_path, cfg)  # a run without the file: what evaluation decodes with
    assert (older.temperature, older.max_repeats, older.max_new_tokens) == (0.0, 5, cfg.finetune.max_new_tokens)
    write_generation_config(tmp_path, GenerationDefaults(temperature=0.6, top_p=0.9, max_repeats=2))
    params = chat_params(tmp_path, cfg, temperature=None, top_p=0.5, max_new_tokens=20, seed=4)
    assert (params.temperature, params.top_p, params.max_repeats, params.max_new_tokens, params.seed) == \
        (0.6, 0.5, 2, 20, 4)
