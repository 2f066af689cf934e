"""The trainer's step-addressed batch sampler: deterministic epochs, rank slices, grouping by length."""

import pytest
import torch

from personae.train.trainer import StepBatchSampler


def test_ungrouped_batches_are_consecutive_slices_of_the_epoch_permutation() -> None:
    sampler = StepBatchSampler(50, 4, seed=3, start=0, stop=24, rank=1, world_size=2)
    per_epoch = 50 // 8
    for step in (0, 5, 6, 13):
        epoch, position = divmod(step, per_epoch)
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 7919 + epoch))
        first = position * 8 + 4
        assert sampler.indices(step) == perm[first : first + 4].tolist()


def test_grouped_epoch_keeps_its_examples_and_cuts_padding() -> None:
    lengths = torch.randint(20, 400, (640,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = StepBatchSampler(640, 32, seed=1, start=0, stop=20)
    grouped = StepBatchSampler(640, 32, seed=1, start=0, stop=20, lengths=lengths, group=8)
    plain_batches = [plain.indices(s) for s in range(20)]
    grouped_batches = [grouped.indices(s) for s in range(20)]
    assert sorted(i for b in grouped_batches for i in b) == sorted(i for b in plain_batches for i in b)
    assert all(len(b) == 32 for b in grouped_batches)

    def padded(batches: list[list[int]]) -> int:  # positions a right-padded batch computes
        return sum(32 * max(lengths[i] for i in b) for b in batches)

    real = sum(lengths)
    assert real / padded(grouped_batches) > 0.85 and real / padded(plain_batches) < 0.6
    for first in range(0, 20, 8):  # each run of 8 batches holds the same examples as the plain run
        run = range(first, min(first + 8, 20))
        assert sorted(i for s in run for i in grouped_batches[s]) == sorted(i for s in run for i in plain_batches[s])


def test_grouped_batches_are_deterministic_and_resume_mid_epoch() -> None:
    lengths = list(range(100))
    whole = StepBatchSampler(100, 5, seed=2, start=0, stop=40, lengths=lengths, group=4)
    resumed = StepBatchSampler(100, 5, seed=2, start=13, stop=40, lengths=lengths, group=4)
    assert list(resumed) == list(whole)[13:]


def test_grouping_needs_one_length_per_example() -> None:
    with pytest.raises(ValueError, match="one length per example"):
        StepBatchSampler(10, 2, seed=0, start=0, stop=1, lengths=[1, 2], group=2)
