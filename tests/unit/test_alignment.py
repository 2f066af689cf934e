"""Region-word alignment (multiple-instance learning over the image prefix)."""

from __future__ import annotations

import pytest
import torch

from personae.data.labels import IGNORE_INDEX
from personae.objectives import RegionWordAlignment


def _head(embeddings: torch.Tensor):
    return lambda hidden: hidden @ embeddings.T


def test_each_name_takes_the_region_that_reads_it_best():
    embeddings = torch.eye(6)  # word w's embedding is the unit vector e_w
    prefix = torch.zeros(1, 4, 6)  # cls + 3 regions
    prefix[0, 0, 2] = 50.0  # the cls region reads word 2 best, but cls is never a candidate
    prefix[0, 1, 3] = 5.0
    prefix[0, 2, 4] = 5.0
    prefix.requires_grad_(True)
    out = RegionWordAlignment()(prefix, torch.tensor([[3, 2]]), _head(embeddings))
    # word 3: region 1 reads it at log softmax([5, 0, 0, 0, 0, 0])[0]; word 2: no region favours it
    best_3 = torch.log_softmax(torch.tensor([5.0, 0, 0, 0, 0, 0]), 0)[0]
    best_2 = torch.log_softmax(torch.tensor([0.0, 0, 0, 0, 0, 0]), 0)[0]  # region 3 (all zeros) reads it best
    assert out["loss_align"].item() == pytest.approx(-(best_3 + best_2).item() / 2, abs=1e-5)
    assert out["align_acc"].item() == pytest.approx(0.5)  # word 3 is region 1's top word; word 2 is nobody's
    out["loss_align"].backward()
    touched = prefix.grad.abs().sum(-1)[0]
    assert touched[0] == 0 and touched[1] > 0 and touched[2] == 0 and touched[3] > 0  # only the chosen regions


def test_padding_names_count_for_nothing_and_no_names_give_zero():
    embeddings = torch.randn(10, 4)
    prefix = torch.randn(2, 3, 4, requires_grad=True)
    loss = RegionWordAlignment()
    one = loss(prefix[:1], torch.tensor([[7]]), _head(embeddings))["loss_align"]
    padded = loss(prefix, torch.tensor([[7], [IGNORE_INDEX]]), _head(embeddings))["loss_align"]
    assert padded.item() == pytest.approx(one.item())
    empty = loss(prefix, torch.full((2, 1), IGNORE_INDEX), _head(embeddings))
    assert empty["loss_align"].item() == 0.0
    empty["loss_align"].backward()  # still part of the graph, so DDP and the trainer see a loss
