"""Tests for PairDataset and collate_pairs: shapes, dtypes, caching, groups, errors."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from personae.data.images import IMAGE_MEAN, IMAGE_STD
from personae.data.manifest import read_pairs
from personae.data.pairs import PairDataset, collate_pairs, scene_group
from personae.data.tokenizer import Tokenizer, train_tokenizer
from personae.errors import DataError

CAPTIONS = ["a red square", "a green field at dusk", "a blue sky", "the same red square, again"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CAPTIONS * 5, vocab_size=300)


def _manifest(root: Path) -> Path:
    (root / "images").mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (30 + 10 * i, 20), colour).save(root / f"images/{i}.png")
    rows = [
        {"image": "images/0.png", "caption": CAPTIONS[0], "scene_id": "red"},
        {"image": "images/1.png", "caption": CAPTIONS[1], "scene_id": "green"},
        {"image": "images/2.png", "caption": CAPTIONS[2], "scene_id": "blue"},
        {"image": "images/0.png", "caption": CAPTIONS[3], "scene_id": "red"},
    ]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("cache_images", [True, False])
def test_items_and_batch(tmp_path: Path, tok: Tokenizer, cache_images: bool) -> None:
    dataset = PairDataset(read_pairs(_manifest(tmp_path)), tok, image_size=8, max_text_len=5,
                          cache_images=cache_images)
    assert len(dataset) == 4
    item = dataset[1]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 8, 8)
    assert item["image"][1].min() == 255 and item["image"][0].max() == 0  # green
    assert item["input_ids"].dtype == torch.long and item["input_ids"][0] == tok.cls_id
    assert item["input_ids"].tolist() == tok.encode(CAPTIONS[1], max_length=5)
    assert item["index"] == 1 and item["group"] == scene_group("green")
    assert dataset[-1]["index"] == 3
    with pytest.raises(IndexError):
        dataset[4]
    batch = collate_pairs([dataset[i] for i in range(4)], tok.pad_id)
    lengths = [len(tok.encode(c, max_length=5)) for c in CAPTIONS]
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, max(lengths))
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][~batch["attention_mask"]] == tok.pad_id).all()
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.long
    groups = batch["group"].tolist()
    assert groups[0] == groups[3] and len(set(groups)) == 3 and batch["group"].dtype == torch.long
    red = (1.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]
    assert batch["pixel_values"][0, 0].mean().item() == pytest.approx(red, abs=1e-4)


def test_cache_decodes_each_file_once(tmp_path: Path, tok: Tokenizer) -> None:
    dataset = PairDataset(read_pairs(_manifest(tmp_path)), tok, image_size=8, max_text_len=16)
    assert dataset._cache is not None and dataset._cache.pixels.shape == (3, 3, 8, 8)
    torch.testing.assert_close(dataset[0]["image"], dataset[3]["image"])
    pickle.loads(pickle.dumps(dataset))  # DataLoader workers under spawn need this


def test_uncollated_uint8_and_dataloader(tmp_path: Path, tok: Tokenizer) -> None:
    dataset = PairDataset(read_pairs(_manifest(tmp_path)), tok, image_size=8, max_text_len=16)
    collate = functools.partial(collate_pairs, pad_id=tok.pad_id, normalize=False)
    batches = list(DataLoader(dataset, batch_size=3, collate_fn=collate))
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 1]
    assert batches[0]["pixel_values"].dtype == torch.uint8


def test_scene_group_is_stable_and_non_negative() -> None:
    assert scene_group("s000123") == 4843473819219225642  # blake2b: the same in every process
    values = [scene_group(f"s{i}") for i in range(1000)]
    assert len(set(values)) == 1000 and min(values) >= 0 and max(values) < 2**63


def test_bad_image_names_manifest_line(tmp_path: Path, tok: Tokenizer) -> None:
    path = _manifest(tmp_path)
    (tmp_path / "images/2.png").write_bytes(np.random.default_rng(0).bytes(64))
    manifest = read_pairs(path)
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: image .*2\.png is not a readable image"):
        PairDataset(manifest, tok, image_size=8, max_text_len=16)
    lazy = PairDataset(manifest, tok, image_size=8, max_text_len=16, cache_images=False)
    with pytest.raises(DataError, match=r"pairs\.jsonl:3:"):
        lazy[2]


def test_empty_manifest_and_empty_batch(tmp_path: Path, tok: Tokenizer) -> None:
    path = _manifest(tmp_path)
    with pytest.raises(DataError, match="no rows"):
        PairDataset(read_pairs(path, split="test"), tok, image_size=8, max_text_len=8)
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], 0)
