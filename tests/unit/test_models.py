"""Every preset and fusion kind: shapes, finite outputs, and a gradient for every parameter."""

import pytest
import torch

from personae.config import load_preset
from personae.models import PersonaeModel


def _loss_touching_everything(model: PersonaeModel, pixels, ids, mask) -> torch.Tensor:
    out = model(pixels, ids, mask)
    fused = model.fuse(out.regions, out.words, mask)
    itc = (out.image_embed @ out.text_embed.T * out.logit_scale).logsumexp(-1).mean()
    return itc + model.itm_logits(fused).sum() + model.mlm_logits(fused.words).logsumexp(-1).mean()


@pytest.mark.parametrize("preset", ["tiny", "small", pytest.param("base", marks=pytest.mark.slow)])
@pytest.mark.parametrize("fusion", ["cross", "single"])
def test_every_parameter_gets_a_gradient(preset, fusion):
    cfg = load_preset(preset).model
    cfg.fusion.kind, cfg.text.vocab_size = fusion, 300
    torch.manual_seed(0)
    model = PersonaeModel(cfg)
    S, T = cfg.vision.image_size, 12
    pixels, ids = torch.randn(2, S, S).expand(3, 2, S, S).transpose(0, 1), torch.randint(0, 300, (2, T))
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 8:] = False
    loss = _loss_touching_everything(model, pixels.contiguous(), ids, mask)
    assert torch.isfinite(loss)
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, f"parameters without gradient: {silent}"


def test_shapes_and_unit_norm_embeddings():
    cfg = load_preset("tiny").model
    cfg.text.vocab_size = 100
    model = PersonaeModel(cfg).eval()
    out = model(torch.randn(3, 3, 64, 64), torch.randint(0, 100, (3, 9)))
    n_regions = 1 + (64 // cfg.vision.patch_size) ** 2
    assert out.regions.shape == (3, n_regions, cfg.vision.width)
    assert out.words.shape == (3, 9, cfg.text.width)
    torch.testing.assert_close(out.image_embed.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embed.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_padding_does_not_change_the_valid_tokens():
    cfg = load_preset("tiny").model
    cfg.text.vocab_size = 100
    model = PersonaeModel(cfg).eval()
    ids = torch.randint(0, 100, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    pixels = torch.randn(1, 3, 64, 64)
    short, long = model(pixels, ids), model(pixels, padded, mask)
    torch.testing.assert_close(long.words[:, :6], short.words, rtol=1e-4, atol=1e-5)
    fused_short = model.fuse(short.regions, short.words)
    fused_long = model.fuse(long.regions, long.words, mask)
    torch.testing.assert_close(fused_long.cls, fused_short.cls, rtol=1e-4, atol=1e-5)


def test_wrong_image_size_is_a_clear_error():
    cfg = load_preset("tiny").model
    with pytest.raises(ValueError, match="expects 64x64"):
        PersonaeModel(cfg).encode_image(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("fusion", ["cross", "single"])
def test_pooled_regions_in_fusion(fusion):
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.fusion.kind, cfg.fusion.region_pool = 100, fusion, 2
    model = PersonaeModel(cfg).eval()
    out = model(torch.randn(2, 3, 64, 64), torch.randint(0, 100, (2, 5)))
    fused = model.fuse(out.regions, out.words)
    assert fused.regions.shape[1] == 1 + 4 * 4  # cls + the 8x8 grid pooled to 4x4
    cfg.fusion.region_pool = 3
    with pytest.raises(ValueError, match="cannot pool a 8x8 patch grid by 3"):
        PersonaeModel(cfg).fuse(out.regions, out.words)
