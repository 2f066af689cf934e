"""Pretrained towers: CLIP / SigLIP vision folders, the convolutional tower interface, BERT-family text folders."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from personae.config import TEXT_KINDS, VISION_KINDS, ModelCfg, TextCfg, VisionCfg, choices_of
from personae.data.images import model_pixels, normalize_pixels
from personae.errors import DataError
from personae.models.hf_towers import ConvVisionTower, HFTextTower, HFVisionTower
from personae.models.model import TEXT_TOWERS, VISION_TOWERS, PersonaeModel
from personae.objectives import ContrastiveLoss
from tests.hf_folders import bert_folder, clip_folder, siglip_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {"clip": clip_folder(root / "clip"), "siglip": siglip_folder(root / "siglip"),
            "bert": bert_folder(root / "bert")}


def _pixels(size: int, seed: int = 0) -> torch.Tensor:
    """(2, 3, S, S) uint8 images."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (2, 3, size, size), dtype=np.uint8))


def _small(**changes) -> ModelCfg:
    """A micro model config; `changes` replace its vision / text sections."""
    cfg = ModelCfg()
    parts = {"vision": dataclasses.replace(cfg.vision, image_size=32, patch_size=8, width=32, depth=1, heads=2),
             "text": dataclasses.replace(cfg.text, width=32, depth=1, heads=2, max_len=16, vocab_size=64)}
    return dataclasses.replace(cfg, **(parts | changes), fusion=dataclasses.replace(cfg.fusion, depth=1, heads=2),
                               embed_dim=16)


def test_the_registries_have_the_config_choices():
    assert tuple(VISION_TOWERS) == VISION_KINDS == choices_of(VisionCfg, "kind")
    assert tuple(TEXT_TOWERS) == TEXT_KINDS == choices_of(TextCfg, "kind")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vision_regions_are_the_pooled_output_then_the_patch_tokens_on_the_folders_normalisation(folders, kind):
    cfg = VisionCfg(kind=kind, path=str(folders[kind]), image_size=999, patch_size=3, width=7)
    tower = HFVisionTower(cfg).eval()
    assert (cfg.image_size, cfg.patch_size, cfg.width, tower.grid) == (32, 8, 32, 4)  # the folder's own
    settings = json.loads((folders[kind] / "preprocessor_config.json").read_text())
    images = _pixels(32)
    reference = transformers.AutoModel.from_pretrained(folders[kind]).eval() if kind == "siglip" else \
        transformers.CLIPVisionModel.from_pretrained(folders[kind]).eval()
    with torch.no_grad():
        regions = tower(normalize_pixels(images))  # personae's loaders normalise with CLIP's statistics
        theirs = reference(pixel_values=normalize_pixels(images, settings["image_mean"], settings["image_std"]))
    patches = theirs.last_hidden_state[:, 1:] if kind == "clip" else theirs.last_hidden_state
    assert regions.shape == (2, 17, 32)
    torch.testing.assert_close(regions[:, 0], theirs.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regions[:, 1:], patches, atol=1e-5, rtol=1e-5)


def test_the_image_loader_gives_the_size_the_preprocessor_config_names(tmp_path):
    folder = clip_folder(tmp_path / "clip48", image_size=48, patch_size=16)
    model = PersonaeModel(_small(vision=VisionCfg(kind="clip", path=str(folder))))
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    pixels = model_pixels(image, model.cfg.vision.image_size)
    assert pixels.shape == (3, 48, 48)
    assert model.image_prefix_length() == 1 + 3 * 3
    assert model.encode_image(pixels[None]).shape == (1, 10, 32)


def test_a_preprocessor_size_that_does_not_fit_the_position_embeddings_is_refused(tmp_path):
    folder = clip_folder(tmp_path / "clip", processor=False)
    (folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": 64, "image_mean": [0.5] * 3}))
    with pytest.raises(DataError, match="preprocessor_config.json gives images of 64 pixels") as error:
        HFVisionTower(VisionCfg(kind="clip", path=str(folder)))
    assert str(folder) in str(error.value)


def test_bad_tower_folders_name_the_key_and_the_folder(folders, tmp_path):
    with pytest.raises(DataError, match="model.vision.path is empty"):
        HFVisionTower(VisionCfg(kind="clip"))
    with pytest.raises(DataError, match="model.vision.path names does not exist") as error:
        HFVisionTower(VisionCfg(kind="clip", path=str(tmp_path / "gone")))
    assert str(tmp_path / "gone") in str(error.value)
    with pytest.raises(DataError, match="model.vision.kind is 'siglip' but config.json has model_type "
                                        "'clip_vision_model'"):
        HFVisionTower(VisionCfg(kind="siglip", path=str(folders["clip"])))
    with pytest.raises(DataError, match="no config.json .*model.text.path"):
        HFTextTower(TextCfg(kind="hf", path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(DataError, match="'no-such-model' in config.json is not an architecture AutoModel loads"):
        HFTextTower(TextCfg(kind="hf", path=str(tmp_path)))


class TinyConvNet(nn.Module):
    """Two strided convolutions: (B, 3, 32, 32) -> (B, 24, 4, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.GELU(), nn.Conv2d(16, 24, 2, stride=2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels)


def test_a_conv_towers_cells_are_the_regions_row_by_row_after_their_mean():
    cfg = VisionCfg(image_size=32)
    tower = ConvVisionTower(cfg, TinyConvNet())
    assert (tower.grid, cfg.width, cfg.patch_size) == (4, 24, 8)
    pixels = torch.randn(2, 3, 32, 32)
    regions, cells = tower(pixels), tower.backbone(pixels)  # (2, 17, 24), (2, 24, 4, 4)
    assert regions.shape == (2, 17, 24)
    torch.testing.assert_close(regions[:, 1 + 2 * 4 + 3], cells[:, :, 2, 3])  # row 2, column 3
    torch.testing.assert_close(regions[:, 0], cells.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="square feature map"):
        ConvVisionTower(VisionCfg(image_size=32), nn.Conv2d(3, 8, (4, 8), stride=(4, 8)))


def test_a_conv_tower_plugs_into_the_model_through_the_registry_and_trains(monkeypatch):
    monkeypatch.setitem(VISION_TOWERS, "own", lambda cfg, dropout: ConvVisionTower(cfg, TinyConvNet()))
    torch.manual_seed(0)
    model = PersonaeModel(_small())
    assert model.cfg.vision.width == 24 and model.image_prefix_length() == 17
    ids = torch.randint(0, 64, (4, 9))
    out = model(torch.randn(4, 3, 32, 32), ids)
    loss = ContrastiveLoss()(out.image_embed, out.text_embed, out.logit_scale)["loss_itc"]
    loss = loss + model.itm_logits(model.fuse(out.regions, out.words)).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vision.parameters())


def _text_model(folders, **text) -> PersonaeModel:
    torch.manual_seed(0)
    return PersonaeModel(_small(text=TextCfg(kind="hf", path=str(folders["bert"]), max_len=16, vocab_size=0, **text)))


def test_text_words_are_berts_states_and_mean_pooling_averages_the_real_tokens(folders):
    model = _text_model(folders, pooling="mean").eval()
    assert (model.cfg.text.width, model.cfg.text.vocab_size) == (32, 141)  # the folder's own
    bert = transformers.BertModel.from_pretrained(folders["bert"], add_pooling_layer=False).eval()
    ids = torch.randint(5, 141, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    with torch.no_grad():
        words = model.encode_text(ids, mask)
        theirs = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        embed = model.text_embed(words, mask)
    torch.testing.assert_close(words[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(words[1, :4], theirs[1, :4], atol=1e-5, rtol=1e-5)
    assert words[1, 4:].abs().sum() == 0
    pooled = torch.stack([theirs[0].mean(0), theirs[1, :4].mean(0)])
    torch.testing.assert_close(embed, nn.functional.normalize(model.text_proj(pooled), dim=-1), atol=1e-5, rtol=1e-5)
    model.cfg.text.pooling = "cls"
    cls = nn.functional.normalize(model.text_proj(words[:, 0]), dim=-1)
    torch.testing.assert_close(model.text_embed(words, mask), cls)


def test_a_locked_text_tower_gets_no_gradient_and_stays_in_eval_mode(folders):
    model = _text_model(folders, locked=True, pooling="mean").train()
    assert not model.text.training and model.vision.training
    assert not any(p.requires_grad for p in model.text.parameters())
    ids = torch.randint(5, 141, (3, 6))
    out = model(torch.randn(3, 3, 32, 32), ids)
    (model.mlm_logits(model.fuse(out.regions, out.words).words).sum() + out.text_embed.sum()).backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert model.text_proj.weight.grad is not None and model.mlm_head.bias.grad is not None


def test_more_tokens_than_the_folder_has_grow_the_embeddings_and_keep_the_old_rows(folders):
    model = _text_model(folders)
    grown = PersonaeModel(_small(text=TextCfg(kind="hf", path=str(folders["bert"]), max_len=16, vocab_size=145)))
    assert grown.text.word_embeddings.shape == (145, 32) and grown.mlm_logits(torch.zeros(1, 32)).shape == (1, 145)
    torch.testing.assert_close(grown.text.word_embeddings[:141], model.text.word_embeddings)
    with pytest.raises(DataError, match="model.text.max_len=100 is more than the tower's 64 positions"):
        HFTextTower(TextCfg(kind="hf", path=str(folders["bert"]), max_len=100))


def test_a_relative_folder_is_recorded_as_an_absolute_path(folders, monkeypatch):
    monkeypatch.chdir(folders["clip"].parent)
    model = PersonaeModel(_small(vision=VisionCfg(kind="clip", path="clip"),
                                 text=TextCfg(kind="hf", path="./bert", max_len=16, vocab_size=0)))
    assert (model.cfg.vision.path, model.cfg.text.path) == (str(folders["clip"]), str(folders["bert"]))


def test_a_locked_vision_tower_gets_no_gradient_and_stays_in_eval_mode(folders):
    model = PersonaeModel(_small(vision=VisionCfg(kind="clip", path=str(folders["clip"]), locked=True))).train()
    assert not model.vision.training and model.text.training
    out = model(torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 5)))
    (out.image_embed.sum() + model.itm_logits(model.fuse(out.regions, out.words)).sum()).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert model.image_proj.weight.grad is not None and model.itm_head.weight.grad is not None
