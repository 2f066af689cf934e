"""The contrastive loss equals a hand-written reference of DESIGN.md's formula, value and gradient."""

import torch
import torch.nn.functional as F

from personae.objectives.contrastive import ContrastiveLoss


def reference_loss(v: torch.Tensor, w: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        image_row = torch.stack([v[i] @ w[j] / tau for j in range(n)])
        text_row = torch.stack([w[i] @ v[j] / tau for j in range(n)])
        total = total + torch.log_softmax(image_row, 0)[i] + torch.log_softmax(text_row, 0)[i]
    return -total / (2 * n)


def test_value_and_gradient_match_reference():
    torch.manual_seed(0)
    v0 = F.normalize(torch.randn(6, 5), dim=-1)
    w0 = F.normalize(torch.randn(6, 5), dim=-1)
    log_scale0 = torch.tensor(2.3)
    ours = [t.clone().requires_grad_() for t in (v0, w0, log_scale0)]
    theirs = [t.clone().requires_grad_() for t in (v0, w0, log_scale0)]
    loss = ContrastiveLoss()(ours[0], ours[1], ours[2].exp())["loss_itc"]
    expect = reference_loss(theirs[0], theirs[1], 1.0 / theirs[2].exp())
    loss.backward()
    expect.backward()
    torch.testing.assert_close(loss, expect)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)
    assert ours[2].grad.abs() > 0  # the temperature is learnable


def test_perfect_alignment_gives_low_loss_and_full_accuracy():
    embed = torch.eye(4)
    out = ContrastiveLoss()(embed, embed, torch.tensor(100.0))
    assert out["loss_itc"] < 1e-6 and out["itc_acc"] == 1.0
    shuffled = ContrastiveLoss()(embed, embed[[1, 0, 3, 2]], torch.tensor(100.0))
    assert shuffled["loss_itc"] > 50 and shuffled["itc_acc"] == 0.0
