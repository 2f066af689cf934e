"""The copy warm-up: associative-recall batches and a decoder that learns to copy from them."""

from __future__ import annotations

import pytest
import torch

from personae.config import FinetuneCfg, load_preset
from personae.data.labels import IGNORE_INDEX
from personae.errors import PersonaeError
from personae.models.model import PersonaeModel
from personae.tasks import recall_batch
from personae.train.recall import warm_up_recall


def test_recall_batches_repeat_a_segment_and_label_the_repeat():
    generator = torch.Generator().manual_seed(0)
    batch = recall_batch(8, 12, 5, 50, 40, generator)
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["positions"]
    assert ids.shape == labels.shape == positions.shape == (8, 12)
    assert torch.equal(ids[:, :6], ids[:, 6:]) and int(ids.min()) >= 5 and int(ids.max()) < 50
    assert (labels[:, :6] == IGNORE_INDEX).all() and (labels[:, -1] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, 6:-1], ids[:, 7:])  # each repeat position predicts the next token
    assert int(positions.min()) >= 0 and int(positions.max()) < 40
    assert torch.equal(positions - positions[:, :1], torch.arange(12).expand(8, 12))  # consecutive
    assert len(set(positions[:, 0].tolist())) > 1  # random offsets
    with pytest.raises(ValueError, match="recall_length must be even"):
        recall_batch(2, 7, 5, 50, 40, generator)


def test_the_warm_up_teaches_a_fresh_decoder_to_copy(one_thread):
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.max_len = 200, True, 64
    cfg.decoder.width, cfg.decoder.heads = 64, 2
    torch.manual_seed(0)
    model = PersonaeModel(cfg)
    warm = FinetuneCfg(recall_steps=150, recall_length=16)
    warm.train.batch_size = 32
    history = warm_up_recall(model, warm, 5, torch.device("cpu"), progress=False)["history"]
    assert len(history) == 150 and history[0]["recall_acc"] < 0.1
    assert history[-1]["recall_acc"] > 0.9  # it copies the repeat from the first copy
    model.decoder = None
    with pytest.raises(ValueError, match="no decoder"):
        warm_up_recall(model, warm, 5, torch.device("cpu"), progress=False)


def test_the_warm_up_is_for_personae_s_own_decoder():
    class Stub(torch.nn.Module):
        decoder = torch.nn.Linear(2, 2)

        def require_decoder(self):
            return self.decoder

    with pytest.raises(PersonaeError, match="recall_steps warms up personae's own decoder"):
        warm_up_recall(Stub(), FinetuneCfg(recall_steps=1), 5, torch.device("cpu"), progress=False)
