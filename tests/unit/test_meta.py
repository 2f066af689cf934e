"""MAML-family invariants (learn2learn-style): clone/adapt, meta-gradients, first/second order, vmap vs loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from personae.config import DecoderCfg
from personae.meta import META, MetaCfg, StackError, adapt_task, build_meta, inner_trajectory, meta_loss, stack_tasks
from personae.models.decoder import Decoder
from personae.models.lora import add_decoder_lora

pytestmark = pytest.mark.usefixtures("one_thread")


class Regression(nn.Module):
    """A tiny MLP with a mean-squared-error loss on {"x", "y"} batches."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((self.net(batch["x"]) - batch["y"]) ** 2).mean()


class TinyLM(nn.Module):
    """The personae decoder, tiny, with a dense (vmappable) next-token loss that ignores label -100."""

    def __init__(self, vocab: int = 24) -> None:
        super().__init__()
        self.decoder = Decoder(DecoderCfg(enabled=True, width=16, depth=1, heads=2, max_len=16), vocab, 8)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.decoder(self.decoder.embed(batch["input_ids"]))  # (B, T, D)
        logits = self.decoder.logits(hidden)[:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def regression_task(seed: int, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 2, generator=g, dtype=dtype)
    x = torch.randn(10, 3, generator=g, dtype=dtype)
    return {"x": x[:5], "y": x[:5] @ weight}, {"x": x[5:], "y": x[5:] @ weight}


def lm_task(seed: int, length: int, vocab: int = 24) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    pair = []
    for _ in range(2):
        ids = torch.randint(1, vocab, (3, length), generator=g)
        pair.append({"input_ids": ids, "labels": ids.clone()})
    return pair[0], pair[1]


def loss_fn_of(module: nn.Module):
    return lambda params, batch: torch.func.functional_call(module, params, (batch,))


def test_zero_step_adapt_returns_the_base_model():
    torch.manual_seed(0)
    model = Regression()
    params = dict(model.named_parameters())
    support, query = regression_task(0)
    adapted = adapt_task(params, loss_fn_of(model), support, steps=0, lr=0.1)
    assert all(adapted[k] is params[k] for k in params)
    learner = META["maml"](model, MetaCfg(inner_steps=0))
    fast = learner.adapt(support)
    torch.testing.assert_close(learner.call(fast, query), model(query), rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "anil"])
def test_meta_gradient_reaches_every_base_parameter(algo):
    torch.manual_seed(0)
    model = Regression()
    learner = build_meta(model, MetaCfg(algo=algo, inner_steps=2, inner_lr=0.1), head=("net.2",))
    learner.meta_loss([regression_task(i) for i in range(3)]).backward()
    for name, p in model.named_parameters():
        if algo == "anil" or name in learner.names:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert learner.names == (["net.2.weight", "net.2.bias"] if algo == "anil" else list(dict(model.named_parameters())))


def test_query_loss_falls_after_adaptation():
    torch.manual_seed(0)
    model = Regression()
    learner = META["maml"](model, MetaCfg(inner_steps=10, inner_lr=0.2))
    before, after = [], []
    for seed in range(5):
        support, query = regression_task(seed)
        fast = learner.adapt(support)
        assert all(not t.requires_grad for t in fast.values())  # inference adaptation keeps no graph
        with torch.no_grad():
            assert learner.loss(fast, support).item() < 0.2 * model(support).item()
            before.append(model(query).item())
            after.append(learner.loss(fast, query).item())
    assert sum(after) < 0.5 * sum(before), (before, after)


def test_first_order_gradient_equals_hand_written_reference():
    torch.manual_seed(0)
    model = Regression()
    tasks = [regression_task(i) for i in range(3)]
    learner = META["fomaml"](model, MetaCfg(inner_steps=2, inner_lr=0.1, vmap="off"))
    learner.meta_loss(tasks).backward()
    reference = [torch.zeros_like(p) for p in model.parameters()]
    for support, query in tasks:
        fast = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            fast = [w.requires_grad_() for w in fast]
            loss = torch.func.functional_call(model, dict(zip(learner.names, fast)), (support,))
            fast = [w.detach() - 0.1 * g for w, g in zip(fast, torch.autograd.grad(loss, fast))]
        fast = [w.requires_grad_() for w in fast]
        loss = torch.func.functional_call(model, dict(zip(learner.names, fast)), (query,))
        for total, g in zip(reference, torch.autograd.grad(loss, fast)):
            total += g / len(tasks)
    for p, expected in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, expected)


def test_second_order_meta_gradient_passes_gradcheck():
    torch.manual_seed(0)
    model = Regression(torch.float64)
    names = [name for name, _ in model.named_parameters()]
    tasks = [regression_task(i, torch.float64) for i in range(2)]

    def objective(*values: torch.Tensor) -> torch.Tensor:
        return meta_loss(dict(zip(names, values)), loss_fn_of(model), tasks, steps=2, lr=0.3)

    inputs = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    assert torch.autograd.gradcheck(objective, inputs, eps=1e-6, atol=1e-5)
    # and it differs from the first-order gradient: second-order terms are really there
    second = torch.autograd.grad(objective(*inputs), inputs)
    first = torch.autograd.grad(meta_loss(dict(zip(names, inputs)), loss_fn_of(model), tasks, steps=2, lr=0.3,
                                          first_order=True), inputs)
    assert max((a - b).abs().max().item() for a, b in zip(first, second)) > 1e-4


@pytest.mark.parametrize("algo,optimizer", [("maml", "sgd"), ("fomaml", "sgd"), ("reptile", "sgd"), ("anil", "sgd"),
                                             ("maml", "adam"), ("fomaml", "adam")])
def test_vmapped_and_looped_meta_batches_give_the_same_gradients(algo, optimizer):
    grads = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = Regression()
        cfg = MetaCfg(algo=algo, inner_steps=3, inner_lr=0.1, vmap=mode, inner_optimizer=optimizer)
        learner = build_meta(model, cfg, head=("net.2",))
        value = learner.meta_loss([regression_task(i) for i in range(4)])
        value.backward()
        grads[mode] = [value.detach()] + [p.grad for p in model.parameters()]
    for a, b in zip(grads["on"], grads["off"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_vmap_over_padded_decoder_tasks_matches_the_loop():
    """Tasks of different lengths are right-padded to stack; the causal loss ignores the padding."""
    tasks = [lm_task(0, 6), lm_task(1, 9), lm_task(2, 7)]
    grads = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = TinyLM().eval()
        learner = META["maml"](model, MetaCfg(inner_steps=2, inner_lr=0.5, vmap=mode),
                               pad_values={"input_ids": 0, "labels": -100})
        learner.meta_loss(tasks).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["on"].keys() == grads["off"].keys() and "decoder.blocks.0.attn.qkv.weight" in grads["on"]
    for name in grads["on"]:
        torch.testing.assert_close(grads["on"][name], grads["off"][name], rtol=1e-4, atol=1e-6)


def test_learned_inner_rates_get_the_meta_sgd_gradient():
    torch.manual_seed(0)
    model = Regression()
    learner = META["maml"](model, MetaCfg(inner_steps=1, inner_lr=0.1, learn_inner_lr=True))
    support, query = regression_task(0)
    learner.meta_loss([(support, query)]).backward()
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    inner = torch.autograd.grad(loss_fn_of(model)(params, support), list(params.values()))
    fast = {n: (p - 0.1 * g).detach().requires_grad_() for (n, p), g in zip(params.items(), inner)}
    outer = torch.autograd.grad(loss_fn_of(model)(fast, query), list(fast.values()))
    for (name, _), g_in, g_out in zip(params.items(), inner, outer):  # dL/dlr = -g_support * g_query
        torch.testing.assert_close(learner.inner_lrs[name.replace(".", "/")].grad, -g_in * g_out)
    assert set(learner.inner_lr_tensors()) == set(learner.names)


def test_adam_inner_loop_follows_torch_adam_step_by_step():
    torch.manual_seed(0)
    model = Regression()
    support, _ = regression_task(0)
    names = [name for name, _ in model.named_parameters()]
    trajectory = list(inner_trajectory(dict(model.named_parameters()), names,
                                       lambda p: loss_fn_of(model)(p, support), steps=4, lr=0.01,
                                       create_graph=False, optimizer="adam"))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    optimizer = torch.optim.Adam(reference, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    for fast in trajectory[1:]:
        optimizer.zero_grad()
        loss_fn_of(model)(dict(zip(names, reference)), support).backward()
        optimizer.step()
        for name, expected in zip(names, reference):
            torch.testing.assert_close(fast[name], expected.detach(), rtol=1e-5, atol=1e-6)
    assert all(trajectory[0][name] is not trajectory[-1][name] for name in names)


def test_adam_inner_loop_second_order_gradient_is_finite_where_gradients_are_zero():
    torch.manual_seed(0)
    model = TinyLM()  # sequences of 6 tokens: the position rows 6..15 get exactly zero inner gradients
    support, query = lm_task(0, 6, vocab=24)
    learner = META["maml"](model, MetaCfg(inner_steps=2, inner_lr=0.01, inner_optimizer="adam",
                                          learn_inner_lr=True, vmap="off"))
    learner.meta_loss([(support, query)]).backward()
    grads = {n: p.grad for n, p in [*model.named_parameters(), *learner.inner_lrs.items()] if p.grad is not None}
    assert len(grads) > 20 and all(torch.isfinite(g).all() for g in grads.values())
    assert grads["decoder.pos_embed"][0, 6:].abs().sum() == 0 < grads["decoder.pos_embed"][0, :6].abs().sum()
    with pytest.raises(ValueError, match="inner_optimizer"):
        META["maml"](model, MetaCfg(inner_optimizer="rmsprop"))


def test_reptile_update_equals_the_hand_computed_one():
    torch.manual_seed(0)
    model = Regression()
    start = [p.detach().clone() for p in model.parameters()]
    tasks = [regression_task(i) for i in range(3)]
    learner = META["reptile"](model, MetaCfg(algo="reptile", inner_steps=3, inner_lr=0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    learner.meta_loss(tasks).backward()
    optimizer.step()
    mean = [torch.zeros_like(p) for p in start]
    for support, _ in tasks:
        fast = [p.clone() for p in start]
        for _ in range(3):
            fast = [w.requires_grad_() for w in fast]
            loss = torch.func.functional_call(model, dict(zip(learner.names, fast)), (support,))
            fast = [w.detach() - 0.1 * g for w, g in zip(fast, torch.autograd.grad(loss, fast))]
        for total, w in zip(mean, fast):
            total += w / len(tasks)
    for p, theta, target in zip(model.parameters(), start, mean):
        torch.testing.assert_close(p.detach(), theta + 0.5 * (target - theta))


def test_lora_maml_adapts_only_the_adapters_and_learns_the_base_weights():
    torch.manual_seed(0)
    model = TinyLM().eval()
    add_decoder_lora(model, 2, 4.0)
    learner = build_meta(model, MetaCfg(algo="lora-maml", inner_steps=2, inner_lr=0.5))
    assert learner.names and all(n.endswith(("lora_A", "lora_B")) for n in learner.names)
    learner.meta_loss([lm_task(0, 8), lm_task(1, 8)]).backward()
    named = dict(model.named_parameters())
    assert named["decoder.blocks.0.attn.qkv.base.weight"].grad.abs().sum() > 0
    assert named["decoder.blocks.0.mlp.fc.lora_A"].grad.abs().sum() > 0  # A learns through B's inner step


def test_configuration_errors_are_specific():
    model = Regression()
    with pytest.raises(ValueError, match="unknown meta.algo 'mamll'; choose one of maml, fomaml"):
        build_meta(model, MetaCfg(algo="mamll"))
    with pytest.raises(ValueError, match="add_decoder_lora"):
        build_meta(model, MetaCfg(algo="lora-maml"))
    with pytest.raises(ValueError, match="'anil' adapts 'head' by definition"):
        build_meta(model, MetaCfg(algo="anil", inner_params="all"), head=("net.2",))
    with pytest.raises(ValueError, match="reptile has none"):
        build_meta(model, MetaCfg(algo="reptile", learn_inner_lr=True))
    with pytest.raises(ValueError, match="unknown meta.vmap 'yes'"):
        build_meta(model, MetaCfg(vmap="yes"))


def test_stack_tasks_pads_only_what_it_may():
    tasks = [lm_task(0, 5), lm_task(1, 7)]
    stacked = stack_tasks(tasks, {"input_ids": 0, "labels": -100})
    assert stacked.support["input_ids"].shape == (2, 3, 7) and stacked.num_tasks == 2
    assert (stacked.support["labels"][0, :, 5:] == -100).all() and (stacked.support["input_ids"][0, :, 5:] == 0).all()
    torch.testing.assert_close(stacked.task(1)[0]["input_ids"], tasks[1][0]["input_ids"])
    with pytest.raises(StackError, match="key 'input_ids'.*no pad value"):
        stack_tasks(tasks)
    uneven = [regression_task(0), ({"x": torch.zeros(4, 3), "y": torch.zeros(4, 2)}, regression_task(1)[1])]
    with pytest.raises(StackError, match="dimension 0"):
        stack_tasks(uneven, {"x": 0})
    learner = META["maml"](Regression(), MetaCfg(inner_steps=1, vmap="on"))
    with pytest.raises(StackError):
        learner.meta_loss(uneven)
    META["maml"](Regression(), MetaCfg(inner_steps=1, vmap="auto")).meta_loss(uneven)  # falls back to the loop


def test_a_loss_that_cannot_be_vmapped_says_so():
    class MaskedLoss(Regression):
        def forward(self, batch):
            selected = batch["y"] > 0
            return ((self.net(batch["x"]) - batch["y"])[selected] ** 2).mean()  # data-dependent shape

    learner = META["maml"](MaskedLoss(), MetaCfg(inner_steps=1, vmap="on"))
    with pytest.raises(RuntimeError, match="vmap='off'"):
        learner.meta_loss([regression_task(0), regression_task(1)])
    assert torch.isfinite(META["maml"](MaskedLoss(), MetaCfg(inner_steps=1, vmap="off")).meta_loss(
        [regression_task(0), regression_task(1)]))


class DenseRolePlayLoss(nn.Module):
    """The personae model's reply loss over [image prefix; tokens], dense so that vmap can batch it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model.lm_logits(batch["pixel_values"], batch["input_ids"])[:, :-1]  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_personae_model_with_images_vmaps_like_the_loop():
    from personae.models.model import PersonaeModel
    from tests.conftest import micro_config

    cfg = micro_config("model.decoder.enabled=true", "model.text.vocab_size=50", "model.decoder.max_len=40").model
    g = torch.Generator().manual_seed(0)

    def batch(length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 50, (2, length), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # the prompt carries no loss
        return {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}

    tasks = [(batch(6), batch(8)), (batch(9), batch(5))]
    grads = {}
    for mode in ("on", "off"):
        torch.manual_seed(0)
        model = PersonaeModel(cfg).eval()
        model.text.requires_grad_(False)  # the reply loss does not use the text tower or the fusion
        model.fusion.requires_grad_(False)
        learner = build_meta(DenseRolePlayLoss(model), MetaCfg(algo="maml", inner_steps=1, inner_lr=0.1, vmap=mode),
                             pad_values={"input_ids": 0, "labels": -100})
        learner.meta_loss(tasks).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert "vision.blocks.0.attn.qkv.weight" in grads["on"] and grads["on"].keys() == grads["off"].keys()
    for name in grads["on"]:
        torch.testing.assert_close(grads["on"][name], grads["off"][name], rtol=1e-4, atol=1e-6)
