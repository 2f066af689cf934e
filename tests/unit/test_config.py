"""Configs: presets load, JSON round trip, strict keys, dotted overrides with clear errors."""

import argparse
import json
import logging
import re

import pytest
import torch
import yaml

from personae.app.cli import build_parser, main
from personae.config import (
    Config,
    ConfigError,
    FusionCfg,
    MetaCfg,
    apply_overrides,
    choices_of,
    from_dict,
    list_presets,
    load_config,
    load_preset,
    save_config,
    to_dict,
)


def test_presets_load_and_round_trip(tmp_path):
    assert {"tiny", "small", "base"} <= set(list_presets())
    for name in list_presets():
        cfg = load_preset(name)
        save_config(cfg, tmp_path / f"{name}.json")
        assert load_config(tmp_path / f"{name}.json") == cfg
        assert from_dict(Config, to_dict(cfg)) == cfg


def test_overrides_are_typed():
    cfg = apply_overrides(load_preset("tiny"), ["--train.lr=3e-4", "model.fusion.kind=single", "train.bf16=true",
                                                "train.steps=12", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 3e-4 and cfg.model.fusion.kind == "single" and cfg.train.bf16 is True
    assert cfg.train.steps == 12 and cfg.train.betas == (0.8, 0.9)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'.*valid keys here: steps, batch_size"),
    ("trian.lr=1", "unknown config section 'trian'"),
    ("train.steps=1.5", "'train.steps' needs an integer"),
    ("train.lr=fast", "'train.lr' needs float"),
    ("train.bf16=maybe", "'train.bf16' needs true/false"),
    ("train.lr", "must look like --section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_preset("tiny"), [override])


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  vision:\n    widht: 3\n")
    with pytest.raises(ConfigError, match="model.vision.widht"):
        load_preset(str(path))


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped presets: base, hf-llava-style, hf-minilm-lit, real, small, tiny"):
        load_preset("huge")


CHOICE_KEYS = ["meta.algo", "meta.inner_params", "meta.inner_optimizer", "meta.vmap", "meta.randomness",
               "model.fusion.kind", "model.decoder.kind"]


def _choices(key: str) -> tuple[str, ...]:
    section, name = key.rsplit(".", 1)
    node = Config()
    for part in section.split("."):
        node = getattr(node, part)
    return choices_of(type(node), name)


def _nested(key: str, value: object) -> dict:
    data: dict = value  # type: ignore[assignment]
    for part in reversed(key.split(".")):
        data = {part: data}
    return data


@pytest.mark.parametrize("key", CHOICE_KEYS)
def test_a_bad_choice_fails_at_parse_time_naming_the_valid_values(key, tmp_path):
    valid = ", ".join(_choices(key))
    message = f"config key '{key}' must be one of {re.escape(valid)}; got 'nope'"
    with pytest.raises(ConfigError, match=message):
        apply_overrides(load_preset("tiny"), [f"--{key}=nope"])
    with pytest.raises(ConfigError, match=message):
        from_dict(Config, _nested(key, "nope"))
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump(_nested(key, "nope")))
    with pytest.raises(ConfigError, match=message):
        load_preset(str(preset))
    saved = tmp_path / "config.json"
    data = to_dict(load_preset("tiny"))
    node = data
    for part in key.split(".")[:-1]:
        node = node[part]
    node[key.rsplit(".", 1)[1]] = "nope"
    saved.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        load_config(saved)


def test_the_cli_rejects_a_bad_choice_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_preset("tiny"), run / "config.json")
    args = [str(run), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]
    assert main(["-q", "meta-train", *args, "--meta.algo=nope"]) == 2
    assert "'meta.algo' must be one of maml, fomaml, reptile, anil, lora-maml" in capsys.readouterr().err
    assert main(["-q", "pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--model.fusion.kind=nope"]) == 2
    assert "'model.fusion.kind' must be one of cross, single" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-q", "meta-train", *args, "--algo", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_registries_and_cli_choices_equal_the_config_choices():
    from personae.meta import META
    from personae.meta.adapt import ALGO_INNER_PARAMS
    from personae.meta.maml import ADAPTED_PARAMS
    from personae.models.fusion import FUSIONS

    assert tuple(META) == choices_of(MetaCfg, "algo")
    assert tuple(FUSIONS) == choices_of(FusionCfg, "kind")
    assert ("auto", *ADAPTED_PARAMS) == choices_of(MetaCfg, "inner_params")
    assert {learner.default_inner_params for learner in META.values()} <= set(ADAPTED_PARAMS)
    assert set(ALGO_INNER_PARAMS) <= set(META) and set(ALGO_INNER_PARAMS.values()) <= set(ADAPTED_PARAMS)
    actions = {a.dest: a for p in _subparsers(build_parser()) for a in p._actions}
    assert tuple(actions["algo"].choices) == tuple(META)
    assert tuple(actions["inner_params"].choices) == choices_of(MetaCfg, "inner_params")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def test_an_old_runs_config_with_removed_keys_loads_with_a_note(tmp_path, caplog):
    data = to_dict(load_preset("tiny"))
    data["train"]["eval_every"] = 100
    data["finetune"]["train"]["eval_every"] = 0
    data["model"]["decoder"]["conditioning"] = "prefix"
    data["meta"]["adapt"] = "head"  # renamed: meta.inner_params
    del data["meta"]["inner_params"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="personae.config"):
        cfg = load_config(path)
    assert cfg.meta.inner_params == "head" and cfg.train == load_preset("tiny").train
    notes = caplog.text
    assert "dropped 'train.eval_every'" in notes and "dropped 'model.decoder.conditioning'" in notes
    assert "'meta.adapt' as 'meta.inner_params'" in notes
    data["train"]["eval_evry"] = 1  # anything else unknown is still an error
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="unknown config key 'train.eval_evry'"):
        load_config(path)
    for removed in ("train.eval_every=5", "model.decoder.conditioning=prefix", "meta.adapt=lora"):
        with pytest.raises(ConfigError, match="unknown config key"):
            apply_overrides(load_preset("tiny"), [removed])  # only a saved run's config is upgraded


def test_meta_defaults_have_one_source():
    import personae.meta as meta
    import personae.meta.maml as maml

    assert meta.MetaCfg is MetaCfg and maml.MetaCfg is MetaCfg
    assert meta.META["maml"](torch.nn.Linear(2, 1)).cfg == MetaCfg(algo="maml")


def test_finetune_freeze_vision_is_read_as_model_vision_locked(tmp_path, caplog):
    data = to_dict(load_preset("tiny"))
    data["finetune"]["freeze_vision"] = True  # an older run's key, or a user's YAML
    del data["model"]["vision"]["locked"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="personae.config"):
        assert load_config(path).model.vision.locked is True
    assert "'finetune.freeze_vision' as 'model.vision.locked'" in caplog.text
    data["model"]["vision"]["locked"] = False  # a full config.json holds the new key: it wins, with a note
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.INFO, logger="personae.config"):
        assert load_config(path).model.vision.locked is False
    assert "dropped the old key 'finetune.freeze_vision' = True ('model.vision.locked' = False is set)" in caplog.text
