"""Copy attention: previous real slots under padding, and it learns to copy (cache equality: test_decoder)."""

import torch

from personae.config import DecoderCfg
from personae.models.copy_attention import previous_slots
from personae.models.decoder import Decoder
from personae.models.layers import init_weights


def test_previous_slots_skip_padding_gaps():
    assert previous_slots(0, 3, None, 1, torch.device("cpu")).tolist() == [[-1, 0, 1]]
    assert previous_slots(5, 1, None, 2, torch.device("cpu")).tolist() == [[4], [4]]
    real = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    # new positions 4 and 5: row 0 jumps the gap back to slot 1; row 1 has no gap
    assert previous_slots(4, 2, real, 2, torch.device("cpu")).tolist() == [[1, 4], [3, 4]]
    assert previous_slots(0, 3, real, 2, torch.device("cpu")).tolist() == [[-1, 0, 1], [-1, -1, -1]]


def _copy_task(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """[word of 6 random tokens] [0-5 filler tokens] [separator 0] [the same word]: the repeat is only
    predictable by copying, from a distance that varies (so no fixed positional offset solves it)."""
    word = torch.randint(1, 64, (batch, 6), generator=generator)
    filler = torch.randint(1, 64, (batch, int(torch.randint(0, 6, (1,), generator=generator))), generator=generator)
    ids = torch.cat([word, filler, torch.zeros(batch, 1, dtype=torch.long), word], dim=1)
    return ids, ids.shape[1] - 6  # the repeat's first position


def _copy_accuracy(copy: bool, steps: int = 150) -> float:
    torch.manual_seed(0)
    decoder = Decoder(DecoderCfg(enabled=True, width=32, depth=1, heads=2, max_len=24, copy=copy), 64, 8)
    decoder.apply(init_weights)  # as PersonaeModel does
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids, first = _copy_task(32, generator)
        logits = decoder.logits(decoder(decoder.embed(ids)))[:, first:-1]  # predictions of the repeat's tokens 2..6
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, first + 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    correct = total = 0
    with torch.no_grad():
        for _ in range(4):
            ids, first = _copy_task(64, generator)
            predicted = decoder.logits(decoder(decoder.embed(ids)))[:, first:-1].argmax(-1)
            correct, total = correct + int((predicted == ids[:, first + 1:]).sum()), total + predicted.numel()
    return correct / total


def test_copy_attention_learns_to_repeat_what_it_read_where_plain_attention_does_not_yet():
    with_copy, plain = _copy_accuracy(True), _copy_accuracy(False)
    assert with_copy > 0.9, with_copy
    assert plain < 0.5, plain
