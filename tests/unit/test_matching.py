"""ITM hard negatives: never the positive, never the same group, drawn from the top of the similarities."""

import pytest
import torch

from personae.objectives.matching import sample_hard_negatives


def test_negatives_are_never_the_positive():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        sim = torch.randn(8, 8) * 5
        sim.diagonal().add_(50)  # the positive is by far the most similar
        assert torch.all(sample_hard_negatives(sim, generator=gen) != torch.arange(8))


def test_negatives_avoid_the_same_group():
    gen = torch.Generator().manual_seed(1)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    for _ in range(200):
        neg = sample_hard_negatives(torch.randn(6, 6), groups, gen)
        assert torch.all(groups[neg] != groups)


def test_hard_negatives_come_from_the_top_more_often_than_chance():
    gen = torch.Generator().manual_seed(2)
    B, trials = 16, 400
    hits = 0
    for t in range(trials):
        sim = torch.randn(B, B, generator=torch.Generator().manual_seed(t)) * 3
        neg = sample_hard_negatives(sim, generator=gen)
        ranked = sim.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf")).argsort(dim=1, descending=True)
        hits += int((ranked[:, :3] == neg[:, None]).any(dim=1).sum())
    top3_rate = hits / (trials * B)
    chance = 3 / (B - 1)
    assert top3_rate > 2.5 * chance, (top3_rate, chance)


def test_row_with_only_same_group_falls_back_to_another_index():
    neg = sample_hard_negatives(torch.zeros(3, 3), torch.tensor([5, 5, 5]), torch.Generator().manual_seed(0))
    assert torch.all(neg != torch.arange(3))


def test_batch_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))
