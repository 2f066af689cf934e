"""LoRA on a Hugging Face decoder: targets per family (GPT-2's Conv1D), LoRA-MAML, per-row adapters in the server."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from personae.config import FinetuneCfg, MetaCfg
from personae.data.hf_tokenizer import HFChatTokenizer
from personae.meta import META, build_meta, stack_tasks
from personae.meta.adapt import HEAD
from personae.models.generation import DecodeBatch, RowRequest, SamplingParams, generate
from personae.models.lora import AdapterError, LoRALinear, add_decoder_lora, lora_parameters, merge_lora, save_adapter
from personae.models.model import PersonaeModel
from personae.serve.adapters import ServerAdapters
from personae.tasks import dense_roleplay_task
from tests.unit.test_hf_decoder import _config, _folder_tokenizer, _model, _prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_folder(tmp_path_factory: pytest.TempPathFactory, family: str):
    """A tiny random causal LM of one family (hidden 32, two layers) with its tokenizer, in a local folder."""
    path = tmp_path_factory.mktemp(family)
    tok = _folder_tokenizer(family)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_config(family, len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return hf_folder(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return hf_folder(tmp_path_factory, "gpt2")


def with_targets(folder, targets: str) -> PersonaeModel:
    model = _model(folder)
    model.cfg = dataclasses.replace(model.cfg, lora_targets=targets)
    return model


def perturb(model: PersonaeModel, seed: int, scale: float = 0.3) -> None:
    """Non-zero B (and a fresh A): the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


IDS = torch.tensor([[3, 9, 12, 7, 20, 5]])


def test_each_family_gets_its_attention_projections_by_default(llama, gpt2):
    model = _model(llama)
    wrapped = add_decoder_lora(model, 2, 4.0)
    assert [n.rsplit(".", 1)[-1] for n in wrapped] == ["q_proj", "k_proj", "v_proj", "o_proj"] * 2
    assert wrapped[0] == "decoder.lm.model.layers.0.self_attn.q_proj"
    model = _model(gpt2)
    wrapped = add_decoder_lora(model, 2, 4.0)
    assert [n.removeprefix("decoder.lm.transformer.h.") for n in wrapped] == [
        f"{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]
    fused = model.get_submodule(wrapped[0])
    assert isinstance(fused, LoRALinear) and fused.fan_in_fan_out and (fused.in_features, fused.out_features) == (32, 96)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_adapter_changes_the_logits_and_merging_keeps_them(family, llama, gpt2):
    model = _model({"llama": llama, "gpt2": gpt2}[family])
    with torch.no_grad():
        plain = model.lm_logits(None, IDS)
        add_decoder_lora(model, 2, 4.0)
        torch.testing.assert_close(model.lm_logits(None, IDS), plain, rtol=0, atol=0)  # B = 0: a no-op
        perturb(model, 1)
        adapted = model.lm_logits(None, IDS)
        assert (adapted - plain).abs().max() > 1e-3
        merge_lora(model)  # GPT-2: the Conv1D weight is (in, out), the delta goes in transposed
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model.lm_logits(None, IDS), adapted, rtol=1e-5, atol=1e-5)


def test_configured_targets_wrap_those_layers_and_an_unknown_one_lists_the_linear_layers(llama):
    model = with_targets(llama, "gate_proj, up_proj,mlp.down_proj")
    wrapped = add_decoder_lora(model, 2, 4.0)
    assert [n.rsplit(".", 1)[-1] for n in wrapped] == ["gate_proj", "up_proj", "down_proj"] * 2
    with pytest.raises(AdapterError, match=r"nope \(model.lora_targets\) name no linear layer.*"
                                           r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        add_decoder_lora(with_targets(llama, "q_proj,nope"), 2, 4.0)


def _tasks(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        pair = []
        for _ in range(2):
            ids = torch.randint(3, 30, (2, 10), generator=g)
            labels = ids.clone()
            labels[:, :4] = -100  # the prompt part carries no loss
            pair.append({"input_ids": ids, "labels": labels})
        tasks.append(tuple(pair))
    return tasks


@pytest.mark.parametrize("algo", ["lora-maml", "fomaml", "anil"])
def test_meta_training_on_the_hf_decoder_adapts_through_functional_call(algo, llama):
    """A few outer steps on a tiny random Llama; the inner loop's fast weights lower the support loss."""
    model = _model(llama).train()
    if algo == "lora-maml":
        add_decoder_lora(model, 2, 4.0, seed=0)
    task = dense_roleplay_task(model, FinetuneCfg())
    cfg = MetaCfg(algo=algo, inner_steps=2, inner_lr=0.5, vmap="off")
    learner = build_meta(task, cfg, head=HEAD)
    assert isinstance(learner, META[algo]) and learner.names
    if algo == "anil":
        assert learner.names == ["model.decoder.lm.model.norm.weight"]
    optimiser = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    for step in range(3):
        loss = learner(_tasks(2, step))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    changed = [n for n, p in task.named_parameters() if not torch.equal(p, before[n])]
    assert changed and (algo != "lora-maml" or any(n.endswith("lora_A") for n in changed))
    support, _ = _tasks(1, 9)[0]
    fast = learner.adapt(support)
    own = learner.loss({}, support).item()
    adapted = learner.loss(fast, support).item()
    assert set(fast) == set(learner.names) and adapted < own - 1e-3


def test_lora_maml_vmapped_equals_looped_on_the_hf_decoder(llama):
    model = _model(llama)
    add_decoder_lora(model, 2, 4.0, seed=0)
    task = dense_roleplay_task(model, FinetuneCfg())
    tasks = _tasks(2, 3)
    losses = {}
    for mode in ("off", "on"):
        learner = build_meta(task, MetaCfg(algo="lora-maml", inner_steps=1, inner_lr=0.5, vmap=mode), head=HEAD)
        losses[mode] = learner(stack_tasks(tasks) if mode == "on" else tasks)
    torch.testing.assert_close(losses["on"], losses["off"], rtol=1e-5, atol=1e-6)


def test_the_server_mixes_two_characters_adapters_per_row_on_an_hf_decoder(llama, tmp_path):
    tok = HFChatTokenizer(llama)
    adapters_dir = tmp_path / "adapters"
    for seed, character in ((1, "ada"), (2, "bob")):
        source = _model(llama)
        add_decoder_lora(source, 2, 4.0)
        perturb(source, seed, scale=1.0)
        save_adapter(adapters_dir / f"{character}.safetensors", lora_parameters(source),
                     {"inner_params": "lora", "lora_rank": 2, "lora_alpha": 4.0})
    model = _model(llama)
    adapters = ServerAdapters(model, adapters_dir)
    assert adapters.status("ada") == adapters.status("bob") == "applied" and adapters.bank is not None
    prompt = _prompt(tok)
    params = SamplingParams(max_new_tokens=8)

    def decode(characters: list[str | None]) -> list[list[int]]:
        batch = DecodeBatch(model, tok, adapters=adapters, max_rows=len(characters))
        rows = batch.join([RowRequest(prompt, None, params, seed=0, adapter=c) for c in characters])
        while batch.rows:
            batch.sample()
            batch.leave([not r.finish for r in batch.rows])
            if batch.rows:
                batch.forward()
        return [r.generation().token_ids for r in rows]

    mixed = decode(["ada", "bob", None])
    alone = [decode([c])[0] for c in ("ada", "bob", None)]
    assert mixed == alone
    assert alone[2] == generate(_model(llama), tok, [prompt], None, params)[0].token_ids  # no adapter: the base
    assert len({tuple(t) for t in alone}) == 3  # each adapter says something else
