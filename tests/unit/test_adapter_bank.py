"""AdapterBank: per-row LoRA adapters in one batch give exactly what each adapter gives alone."""

import copy

import pytest
import torch

from personae.models.adapter_bank import AdapterBank
from personae.models.lora import AdapterError, add_lora, apply_adapter, lora_parameters
from personae.models.model import PersonaeModel
from tests.conftest import micro_config


@pytest.fixture(scope="module")
def model():
    cfg = micro_config("model.decoder.enabled=true", "model.decoder.max_len=64")
    cfg.model.text.vocab_size = 300
    torch.manual_seed(0)
    model = PersonaeModel(cfg.model).eval()
    add_lora(model, targets=("decoder",), rank=4, alpha=8.0)
    return model


def random_adapter(model, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(p.shape, generator=generator) * 0.2 for name, p in lora_parameters(model).items()}


def logits(model, ids):
    with torch.no_grad():
        return model.lm_logits(None, ids)


def test_mixed_batch_equals_each_adapter_alone(model):
    bank = AdapterBank(model)
    adapters = {"ada": random_adapter(model, 1), "bob": random_adapter(model, 2)}
    assert [bank.add(key, tensors) for key, tensors in adapters.items()] == [1, 2]
    ids = torch.randint(5, 300, (4, 9), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([bank.slot("bob"), bank.slot(None), bank.slot("ada"), bank.slot("bob")])
    with bank.route(rows):
        mixed = logits(model, ids)
    for row, key in enumerate(["bob", None, "ada", "bob"]):
        alone = copy.deepcopy(model)
        if key is not None:
            apply_adapter(alone, adapters[key])
        torch.testing.assert_close(mixed[row], logits(alone, ids[row:row + 1])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1])  # the adapters do change the outputs
    with bank.route(bank.slot("ada")):  # one slot for every row: the plain path, same numbers
        torch.testing.assert_close(logits(model, ids[2:3]), mixed[2:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids), logits(copy.deepcopy(model), ids))  # routing ends with the block


def test_replacing_an_adapter_bumps_its_version(model):
    bank = AdapterBank(model)
    bank.add("ada", random_adapter(model, 1))
    ids = torch.randint(5, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    with bank.route(1):
        before = logits(model, ids)
    assert bank.add("ada", random_adapter(model, 5)) == 1 and bank.version("ada") == 2 and len(bank) == 1
    with bank.route(1):
        assert not torch.allclose(before, logits(model, ids))


def test_bad_adapters_are_refused_with_the_key(model):
    bank = AdapterBank(model)
    name = next(iter(lora_parameters(model)))
    with pytest.raises(AdapterError, match="decoder.ln_f.weight.*not a LoRA tensor"):
        bank.add("x", {"decoder.ln_f.weight": torch.ones(64)})
    with pytest.raises(AdapterError, match="has shape"):
        bank.add("x", {name: torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="names no LoRA layer"):
        bank.add("x", {"decoder.nothing.lora_A": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="rows for a batch"):
        with bank.route(torch.tensor([0, 0])):
            logits(model, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(AdapterError, match="no LoRA layers"):
        AdapterBank(torch.nn.Linear(2, 2))


def test_a_removed_adapter_frees_its_slot_for_the_next_one(model):
    bank = AdapterBank(model)
    bank.add("ada", random_adapter(model, 1))
    bank.add("bob", random_adapter(model, 2))
    ids = torch.randint(5, 300, (1, 7), generator=torch.Generator().manual_seed(6))
    with bank.route(2):
        bob = logits(model, ids)
    assert bank.remove("ada") and not bank.remove("ada") and bank.slot("ada") == 0 and len(bank) == 1
    with bank.route(1):  # the freed slot holds the model's own tensors until it is reused
        torch.testing.assert_close(logits(model, ids), logits(copy.deepcopy(model), ids))
    cid = random_adapter(model, 3)
    assert bank.add("cid", cid) == 1 and bank.add("dan", random_adapter(model, 4)) == 3
    alone = copy.deepcopy(model)
    apply_adapter(alone, cid)
    with bank.route(torch.tensor([1])):
        torch.testing.assert_close(logits(model, ids), logits(alone, ids), atol=1e-5, rtol=1e-5)
    with bank.route(2):
        torch.testing.assert_close(logits(model, ids), bob)  # the others keep their slots and tensors
