"""LoRA adapters: no-op at the start, predictable names, merge, adapter files that reload exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from personae.models.lora import (
    AdapterError,
    LoRALinear,
    add_decoder_lora,
    add_lora,
    apply_adapter,
    load_adapter,
    lora_parameters,
    lora_settings,
    merge_lora,
    reset_decoder_lora,
    save_adapter,
)
from personae.models.model import PersonaeModel
from tests.conftest import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")


def micro_model(seed: int = 0) -> PersonaeModel:
    cfg = micro_config("model.decoder.enabled=true", "model.text.vocab_size=60", "model.decoder.max_len=24").model
    torch.manual_seed(seed)
    return PersonaeModel(cfg).eval()


def logits(model: PersonaeModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.lm_logits(None, ids)


def perturb_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


IDS = torch.tensor([[5, 9, 11, 2, 7, 30], [4, 4, 8, 19, 3, 1]])


def test_lora_starts_as_a_no_op_with_predictable_names():
    model = micro_model()
    before = logits(model, IDS)
    replaced = add_lora(model, rank=4, alpha=8)
    assert replaced == [f"decoder.blocks.0.{layer}" for layer in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    torch.testing.assert_close(logits(model, IDS), before, rtol=0, atol=0)
    names = set(lora_parameters(model))
    assert {"decoder.blocks.0.attn.qkv.lora_A", "decoder.blocks.0.attn.qkv.lora_B"} <= names and len(names) == 8
    assert "decoder.blocks.0.attn.qkv.base.weight" in model.state_dict()
    qkv = model.get_submodule("decoder.blocks.0.attn.qkv")
    assert qkv.lora_A.shape == (4, 64) and qkv.lora_B.shape == (192, 4) and qkv.lora_A.abs().sum() > 0
    assert lora_settings(model) == {"rank": 4, "alpha": 8.0}
    assert not any(n.startswith(("text.", "vision.")) for n in names)  # only the decoder is targeted


def test_lora_linear_computes_the_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = LoRALinear(base, rank=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5)
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * 3.0
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected)


def test_merge_lora_keeps_the_function_and_restores_plain_keys():
    model = micro_model()
    plain_keys = set(model.state_dict())
    add_lora(model)
    perturb_adapters(model)
    adapted = logits(model, IDS)
    merge_lora(model)
    assert set(model.state_dict()) == plain_keys and not lora_parameters(model)
    torch.testing.assert_close(logits(model, IDS), adapted, rtol=1e-5, atol=1e-5)


def test_adapter_file_reloads_to_identical_outputs(tmp_path):
    model = micro_model()
    add_lora(model)
    perturb_adapters(model)
    expected = logits(model, IDS)
    path = save_adapter(tmp_path / "adapters" / "tumblewick.safetensors", lora_parameters(model),
                        {"character": "tumblewick", "rank": 4, "alpha": 8.0})
    fresh = micro_model()  # same base weights, adapters at their initial values
    add_lora(fresh)
    assert not torch.equal(logits(fresh, IDS), expected)
    tensors, metadata = load_adapter(path)
    assert set(tensors) == set(lora_parameters(fresh)) and metadata == {"character": "tumblewick", "rank": "4",
                                                                         "alpha": "8.0"}
    apply_adapter(fresh, tensors)
    torch.testing.assert_close(logits(fresh, IDS), expected, rtol=0, atol=0)


def test_adapter_and_lora_errors_name_the_problem(tmp_path):
    model = micro_model()
    add_lora(model)
    with pytest.raises(AdapterError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(AdapterError, match="name no linear layer under nothing"):
        add_lora(micro_model(), targets=("nothing",))
    with pytest.raises(AdapterError, match="adapter file not found"):
        load_adapter(tmp_path / "missing.safetensors")
    plain = micro_model()
    with pytest.raises(AdapterError, match="lora_A' is not a parameter of the model.*add_lora"):
        apply_adapter(plain, lora_parameters(model))
    wrong = {"decoder.blocks.0.attn.qkv.lora_A": torch.zeros(2, 64)}
    with pytest.raises(AdapterError, match=r"shape \(2, 64\), the model's is \(4, 64\)"):
        apply_adapter(model, wrong)
    with pytest.raises(AdapterError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(2, 2), rank=0)


def test_add_decoder_lora_is_seeded_and_reset_starts_placeholders_afresh_the_same_way():
    fresh, placeholder = micro_model(), micro_model()
    wrapped = add_decoder_lora(fresh, 3, 6.0, seed=7)
    assert wrapped and all(name.startswith("decoder.") for name in wrapped)
    assert lora_settings(fresh) == {"rank": 3, "alpha": 6.0}
    add_decoder_lora(placeholder, 3, 6.0, seed=8)  # other draws, as a server's no-op placeholders
    perturb_adapters(placeholder)  # and B no longer zero
    assert reset_decoder_lora(placeholder, seed=7) == len(wrapped)
    ours, theirs = lora_parameters(fresh), lora_parameters(placeholder)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(not p.any() for name, p in theirs.items() if name.endswith("lora_B"))
