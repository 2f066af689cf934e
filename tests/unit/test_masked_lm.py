"""MLM masking: 15% of maskable tokens, 80/10/10, padding and special tokens untouched."""

import torch

from personae.data.labels import IGNORE_INDEX
from personae.objectives.masked_lm import MaskedLanguageModelling, mask_tokens

PAD, CLS, MASK, EOS = 0, 1, 2, 3
SPECIAL = [PAD, CLS, MASK, EOS]
VOCAB = 50


def _batch(B: int = 512, T: int = 40):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (B, T), generator=gen)
    lengths = torch.randint(5, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = EOS
    ids[~mask] = PAD
    return ids, mask


def test_rates_and_untouched_specials():
    ids, mask = _batch()
    masked, labels = mask_tokens(ids, mask, special_ids=SPECIAL, mask_id=MASK, vocab_size=VOCAB,
                                 mask_prob=0.15, generator=torch.Generator().manual_seed(1))
    maskable = mask & (ids >= 4)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~maskable).any()  # padding and specials are never chosen
    assert torch.equal(masked[~maskable], ids[~maskable])  # ... nor changed
    rate = chosen.sum() / maskable.sum()
    assert abs(float(rate) - 0.15) < 0.01
    n = chosen.sum().float()
    to_mask = (masked == MASK) & chosen
    kept = (masked == ids) & chosen
    randomised = chosen & ~to_mask & ~kept
    assert abs(float(to_mask.sum() / n) - 0.8) < 0.03
    # a random replacement can by chance equal the original token: 10% + 10% / 46
    assert abs(float(kept.sum() / n) - (0.1 + 0.1 / 46)) < 0.02
    assert abs(float(randomised.sum() / n) - 0.1 * 45 / 46) < 0.02
    assert torch.all(masked[randomised] >= 4)  # random tokens are never special
    assert torch.equal(labels[chosen], ids[chosen])


def test_loss_only_on_masked_positions():
    words = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2], labels[1, 4] = 3, 7
    head = torch.nn.Linear(8, 10)
    out = MaskedLanguageModelling()(words, labels, head)
    expect = torch.nn.functional.cross_entropy(head(torch.stack([words[0, 2], words[1, 4]])), torch.tensor([3, 7]))
    torch.testing.assert_close(out["loss_mlm"], expect)
    out["loss_mlm"].backward()
    assert words.grad[0, 0].abs().sum() == 0 and words.grad[0, 2].abs().sum() > 0


def test_nothing_masked_gives_zero_loss_with_a_graph():
    words = torch.randn(1, 3, 4, requires_grad=True)
    out = MaskedLanguageModelling()(words, torch.full((1, 3), IGNORE_INDEX), torch.nn.Linear(4, 6))
    assert out["loss_mlm"] == 0
    out["loss_mlm"].backward()
