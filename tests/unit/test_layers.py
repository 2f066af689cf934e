"""Layer helpers: the CPU low-precision attention path and token packing agree with the plain maths."""

import torch
import torch.nn.functional as F

from personae.models.layers import Packing, attention


def test_low_precision_cpu_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask).float()
    torch.testing.assert_close(got, expect, rtol=3e-2, atol=3e-2)
    causal = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True).float()
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=3e-2, atol=3e-2)


def test_packing_round_trip_zeroes_padding():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    packing = Packing.from_mask(mask)
    x = torch.arange(18, dtype=torch.float32).view(2, 3, 3)
    packed = packing.pack(x)
    assert packed.shape == (3, 3)
    back = packing.unpack(packed)
    assert torch.equal(back[mask], x[mask]) and torch.all(back[~mask] == 0)
