"""The copy warm-up before role-play fine-tuning (finetune.recall_steps; personae.tasks.recall)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from personae.config import FinetuneCfg
from personae.errors import PersonaeError
from personae.files import write_text_atomic
from personae.models.decoder import Decoder
from personae.models.model import PersonaeModel
from personae.tasks import RecallTask, recall_batch

RECALL_FILE = "recall_warmup.json"  # the warm-up's losses, in the fine-tuned run's folder
WARMUP_FRACTION = 0.1  # of the steps, a linear ramp of the learning rate (the plateau is left sooner from there)


def warm_up_recall(model: PersonaeModel, cfg: FinetuneCfg, low: int, device: torch.device, *,
                   progress: bool = True) -> dict[str, Any]:
    """cfg.recall_steps AdamW steps of associative recall on the decoder (ids in [low, vocab)); the summary.

    Only the decoder trains (the image tower is not used); batches are finetune.train.batch_size
    sequences of finetune.recall_length tokens, drawn from a generator seeded by finetune.train.seed.
    """
    decoder = model.require_decoder()
    if not isinstance(decoder, Decoder):
        raise PersonaeError("finetune.recall_steps warms up personae's own decoder; a pretrained (Hugging Face) LM "
                            "copies from its context already: set it to 0")
    task = RecallTask(model)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    params = [p for p in decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.recall_lr, weight_decay=0.01)
    ramp = max(1, int(cfg.recall_steps * WARMUP_FRACTION))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / ramp))
    vocab, history = decoder.tok_embed.num_embeddings, []
    model.train()
    bar = tqdm(range(cfg.recall_steps), desc="copy warm-up", disable=not progress)
    for step in bar:
        batch = recall_batch(cfg.train.batch_size, cfg.recall_length, low, vocab, decoder.max_len, generator)
        out = task({key: value.to(device) for key, value in batch.items()})
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history.append({"step": step + 1, "loss": out["loss"].item(), "recall_acc": out["recall_acc"].item()})
        if step % 10 == 0:
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", acc=f"{history[-1]['recall_acc']:.2f}")
    return {"steps": cfg.recall_steps, "history": history}


def save_recall(out_dir: Path, summary: dict[str, Any]) -> Path:
    """RUN/recall_warmup.json: the warm-up's loss and accuracy per step."""
    path = Path(out_dir) / RECALL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(summary, indent=1))
    return path
