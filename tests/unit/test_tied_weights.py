"""Tied weights in model.safetensors: one tensor under two names is stored once and tied again on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from personae.models.io import ALIASES_KEY, CheckpointError, load_tensors, save_state_dict


class TiedLM(nn.Module):
    """Embeddings and an output head that is the same Parameter (GPT-2's wte and lm_head), plus a view buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(4)
        self.register_buffer("first_rows", self.embed.weight.detach()[:2])  # overlaps, but is not the same tensor


def test_a_tied_state_dict_is_stored_once_and_loads_back_tied(tmp_path):
    torch.manual_seed(0)
    saved = TiedLM()
    with pytest.raises(RuntimeError, match="share memory"):  # what write_model_files did before
        save_file(saved.state_dict(), str(tmp_path / "plain.safetensors"))
    save_state_dict(saved.state_dict(), tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["embed.weight", "first_rows", "norm.bias", "norm.weight"]
        assert json.loads(f.metadata()[ALIASES_KEY]) == {"head.weight": "embed.weight"}
    fresh = TiedLM()
    fresh.load_state_dict(load_tensors(tmp_path / "model.safetensors"))  # strict: every name is there
    assert fresh.head.weight is fresh.embed.weight
    torch.testing.assert_close(fresh.head.weight, saved.embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(fresh.first_rows, saved.embed.weight[:2], rtol=0, atol=0)


def test_a_file_without_ties_loads_as_before_and_a_damaged_tie_is_named(tmp_path):
    plain = {"a": torch.ones(2), "b": torch.zeros(3)}
    save_state_dict(plain, tmp_path / "plain.safetensors")
    assert sorted(load_tensors(tmp_path / "plain.safetensors")) == ["a", "b"]
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as f:
        assert ALIASES_KEY not in f.metadata()
    save_file(plain, str(tmp_path / "bad.safetensors"), metadata={ALIASES_KEY: json.dumps({"c": "missing"})})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: personae_aliases ties names to tensors the file "
                                              r"lacks: \['missing'\]"):
        load_tensors(tmp_path / "bad.safetensors")
    save_file(plain, str(tmp_path / "odd.safetensors"), metadata={ALIASES_KEY: "[1, 2]"})
    with pytest.raises(CheckpointError, match="odd.safetensors: damaged personae_aliases metadata"):
        load_tensors(tmp_path / "odd.safetensors")
