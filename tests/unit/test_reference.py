"""docs/reference/ is what tools/gen_reference.py makes from the config dataclasses and the parser now."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from personae.config import Config, TrainCfg, to_dict

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gen_reference.py"


def generator():
    """tools/gen_reference.py, loaded as a module (a developer tool, not part of the package)."""
    spec = importlib.util.spec_from_file_location("gen_reference", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def test_committed_reference_is_current():
    gen = generator()
    for path, text in gen.render_all([]).items():
        assert path.exists(), f"{path} is missing: run python tools/gen_reference.py"
        assert path.read_text() == text, f"{path} is stale: run python tools/gen_reference.py"


def test_check_mode_names_a_stale_file(tmp_path, monkeypatch, capsys):
    gen = generator()
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    monkeypatch.setattr(gen, "REFERENCE_DIR", tmp_path / "docs" / "reference")
    assert gen.main(["--allow-missing"]) == 0
    assert gen.main(["--check", "--allow-missing"]) == 0
    (tmp_path / "docs" / "reference" / "cli.md").write_text("old\n")
    assert gen.main(["--check", "--allow-missing"]) == 1
    assert "docs/reference/cli.md is stale" in capsys.readouterr().err


def test_comments_are_read_trailing_or_above_and_missing_ones_are_reported():
    source = '''
@dataclass
class Sample:
    """A sample."""

    width: int = 8  # channels per token
    # how many blocks,
    # counted from the input
    depth: int = 2

    heads: int = 4
    train: Other = field(default_factory=lambda: Other(
        steps=3))  # the inner loop's settings
'''
    fields = generator().read_field_comments(source)["Sample"]
    assert fields["width"] == (6, "channels per token")
    assert fields["depth"] == (9, "how many blocks, counted from the input")
    assert fields["heads"] == (11, None)  # a blank line separates it from any comment above
    assert fields["train"] == (12, "the inner loop's settings")


def test_config_reference_lists_every_key_with_its_default():
    gen = generator()
    missing: list[str] = []
    sections = gen.config_sections(missing)
    keys = {key.name: key for section in sections for key in section.keys}

    def leaves(data, prefix=""):
        for name, value in data.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", value

    expected = dict(leaves(to_dict(Config())))
    assert set(keys) == set(expected)
    for name, default in expected.items():
        assert keys[name].default == default, name
    # a nested section's defaults come from its own default_factory (finetune.train is not TrainCfg())
    assert keys["finetune.train.steps"].default == Config().finetune.train.steps != TrainCfg().steps
    undocumented = [key.name for key in keys.values() if key.meaning == gen.MISSING]
    assert bool(undocumented) == bool(missing)
    assert len(missing) == len(set(missing))  # a class used by several sections is reported once


def test_cli_reference_has_every_command_and_argument():
    gen = generator()
    text = gen.render_cli()
    parser = gen.build_parser()
    for words, _help, sub in gen.commands(parser, []):
        assert f"## `personae {' '.join(words)}`" in text
        section = text.split(f"## `personae {' '.join(words)}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert f"`{gen.argument_name(action)}`" in section, (words, action.dest)
            for choice in action.choices or ():
                assert f"`{choice}`" in section, (words, action.dest, choice)
