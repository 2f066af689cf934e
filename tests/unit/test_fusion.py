"""Cross-modal attention equals the bare formula; single-stream attention is softmax(QK^T/sqrt d)V."""

import math

import pytest
import torch

from personae.config import FusionCfg
from personae.models.fusion import CrossModalAttention, SingleStreamFusion, build_fusion
from personae.models.layers import SelfAttention


def _identity_cross_attention(dim: int) -> CrossModalAttention:
    module = CrossModalAttention(dim, heads=1, scale=1.0)
    eye = torch.eye(dim)
    with torch.no_grad():
        for proj in (module.region_proj, module.word_proj):
            proj.weight.copy_(torch.cat([eye, eye], dim=0))  # (query|key, value) = (x, x)
            proj.bias.zero_()
        for out in (module.region_out, module.word_out):
            out.weight.copy_(eye)
            out.bias.zero_()
    return module


def test_cross_modal_attention_is_the_bare_formula():
    torch.manual_seed(0)
    N, T, D = 5, 7, 6
    v, w = torch.randn(2, N, D), torch.randn(2, T, D)
    new_v, new_w = _identity_cross_attention(D)(v, w)
    for b in range(2):
        alpha = torch.empty(N, T)
        for i in range(N):
            scores = torch.tensor([float(v[b, i] @ w[b, j]) for j in range(T)])
            alpha[i] = scores.exp() / scores.exp().sum()
        expect_v = torch.stack([sum(alpha[i, j] * w[b, j] for j in range(T)) for i in range(N)])
        expect_w = torch.stack([sum(alpha[i, j] * v[b, i] for i in range(N)) for j in range(T)])
        torch.testing.assert_close(new_v[b], expect_v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_w[b], expect_w, rtol=1e-5, atol=1e-5)


def test_padded_words_get_no_attention():
    torch.manual_seed(1)
    v, w = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    module = _identity_cross_attention(8)
    new_v, new_w = module(v, w, mask)
    short_v, short_w = module(v, w[:, :3])
    torch.testing.assert_close(new_v, short_v)
    torch.testing.assert_close(new_w[:, :3], short_w)
    assert torch.all(new_w[:, 3:] == 0)  # nobody attends to padding


def test_default_scale_is_inverse_sqrt_head_dim():
    assert CrossModalAttention(64, heads=4).scale == pytest.approx(1 / math.sqrt(16))


def test_self_attention_matches_formula():
    torch.manual_seed(2)
    attn = SelfAttention(8, heads=1).eval()
    x = torch.randn(2, 5, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    expect = attn.proj(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), dim=-1) @ v)
    torch.testing.assert_close(attn(x), expect, rtol=1e-5, atol=1e-5)


def test_single_stream_concatenates_regions_over_words():
    torch.manual_seed(3)
    fusion = SingleStreamFusion(FusionCfg(kind="single", depth=1, heads=2), dim=8, num_regions=3, max_words=4)
    regions, words = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    out = fusion(regions, words, None)
    assert out.regions.shape == (2, 3, 8) and out.words.shape == (2, 4, 8)
    torch.testing.assert_close(out.cls, out.words[:, 0])  # the text <cls> sits right after the regions
    # a word depends on the image: changing the regions changes the fused words
    assert not torch.allclose(fusion(torch.randn(2, 3, 8), words, None).words, out.words)


def test_unknown_fusion_kind_names_the_choices():
    with pytest.raises(ValueError, match="cross, single"):
        build_fusion(FusionCfg(kind="late"), 8, 3, 4)
