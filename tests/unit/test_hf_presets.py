"""The presets with pretrained parts parse, take their folders from the command line and build."""

from __future__ import annotations

import pytest
import torch

from personae.config import apply_overrides, load_preset
from personae.models.model import PersonaeModel
from tests.hf_folders import bert_folder, clip_folder, llama_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset_folders")
    return {"clip": clip_folder(root / "clip"), "bert": bert_folder(root / "bert", max_positions=128),
            "llama": llama_folder(root / "llama", ["hello", "there"])}


def test_the_llava_style_preset_builds_a_clip_tower_a_projector_and_the_lm(folders):
    cfg = apply_overrides(load_preset("hf-llava-style"), [
        f"--model.vision.path={folders['clip']}", f"--model.decoder.path={folders['llama']}",
        "--model.decoder.enabled=true", "--model.text.vocab_size=300"])
    assert (cfg.model.vision.kind, cfg.model.vision.locked, cfg.model.decoder.kind) == ("clip", True, "hf")
    model = PersonaeModel(cfg.model).eval()
    assert (cfg.model.vision.image_size, cfg.model.vision.width) == (32, 32)  # the folder's own
    assert model.image_prefix_length() == 1 + 4 * 4
    projector = model.decoder.image_proj
    assert [type(layer).__name__ for layer in projector] == ["Linear", "GELU", "Linear"]  # LLaVA-1.5's MLP
    with torch.no_grad():
        logits = model.lm_logits(torch.randn(1, 3, 32, 32), torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, model.decoder.lm.config.vocab_size) and torch.isfinite(logits).all()


def test_the_minilm_lit_preset_builds_an_own_image_tower_against_a_locked_text_tower(folders):
    cfg = apply_overrides(load_preset("hf-minilm-lit"), [f"--model.text.path={folders['bert']}",
                                                         "--model.vision.image_size=32", "--model.vision.depth=1",
                                                         "--model.fusion.heads=4"])  # fusion runs at the 32-wide tower
    assert (cfg.model.vision.kind, cfg.model.text.kind, cfg.model.text.locked, cfg.model.text.pooling) == \
        ("own", "hf", True, "mean")
    model = PersonaeModel(cfg.model).train()
    assert (cfg.model.text.width, cfg.model.text.vocab_size) == (32, 141)  # the folder's own
    assert not model.text.training and not any(p.requires_grad for p in model.text.parameters())
    out = model(torch.randn(2, 3, 32, 32), torch.randint(5, 141, (2, 6)))
    assert out.image_embed.shape == out.text_embed.shape == (2, cfg.model.embed_dim)


@pytest.mark.parametrize("preset, key", [("hf-llava-style", "model.vision.path"), ("hf-minilm-lit", "model.text.path")])
def test_a_preset_without_its_folder_says_which_key_to_give(preset, key):
    from personae.errors import DataError

    with pytest.raises(DataError, match=f"{key} is empty"):
        PersonaeModel(load_preset(preset).model)


def test_fusion_heads_that_do_not_divide_the_text_towers_width_name_both_keys(folders):
    from personae.config import ConfigError

    cfg = apply_overrides(load_preset("hf-minilm-lit"), [f"--model.text.path={folders['bert']}"])
    with pytest.raises(ConfigError, match="model.fusion.heads=6 does not divide the fusion width 32 "
                                          r"\(model.text.width, the hidden size of model.text.path\)"):
        PersonaeModel(cfg.model)
