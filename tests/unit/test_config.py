"""Configs: presets load, JSON round trip, strict keys, dotted overrides with clear errors."""

import pytest

from personae.config import (
    Config,
    ConfigError,
    apply_overrides,
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
    with pytest.raises(ConfigError, match="shipped presets: base, small, tiny"):
        load_preset("huge")
