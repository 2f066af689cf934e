"""Retrieval evaluation: image->text and text->image R@1/5/10, ITM accuracy, MLM accuracy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from personae.data.labels import IGNORE_INDEX
from personae.data.manifest import PairManifest
from personae.data.pairs import PairDataset, collate_pairs
from personae.data.tokenizer import Tokenizer
from personae.models.model import PersonaeModel
from personae.objectives.masked_lm import mask_tokens

KS = (1, 5, 10)


@dataclass
class EncodedSplit:
    """Everything the metrics need from one pass over a split."""

    image_embed: torch.Tensor  # (N, E)
    text_embed: torch.Tensor  # (N, E)
    itm_correct: int
    itm_total: int
    mlm_correct: int
    mlm_total: int


def recall_at_k(similarity: torch.Tensor, correct: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Share of rows whose top-k columns hold at least one correct column; correct is (N, M) bool."""
    order = similarity.argsort(dim=1, descending=True)
    hits_sorted = correct.gather(1, order)  # (N, M): was the r-th ranked column correct?
    first_hit = torch.where(hits_sorted.any(1), hits_sorted.float().argmax(1), torch.full_like(order[:, 0], 10**9))
    return {k: float((first_hit < k).float().mean()) for k in ks}


def _hardest_negatives(similarity: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """For each image the most similar caption that is not (a duplicate of) its own."""
    return similarity.masked_fill(same, float("-inf")).argmax(dim=1)


@torch.no_grad()
def _encode_split(model: PersonaeModel, dataset: PairDataset, tokenizer: Tokenizer, same: torch.Tensor,
                  batch_size: int, seed: int, progress: bool) -> EncodedSplit:
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         collate_fn=partial(collate_pairs, pad_id=tokenizer.pad_id))
    batches = [{k: v.to(device) for k, v in b.items() if torch.is_tensor(v)}
               for b in tqdm(loader, desc="load", disable=not progress, leave=False)]
    images, texts = [], []
    for batch in batches:
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        images.append(out.image_embed)
        texts.append(out.text_embed)
    image_embed, text_embed = torch.cat(images), torch.cat(texts)
    # every caption padded to one length, so that any row can be fetched as a hard negative
    T = max(b["input_ids"].shape[1] for b in batches)
    all_ids = torch.cat([F.pad(b["input_ids"], (0, T - b["input_ids"].shape[1]), value=tokenizer.pad_id)
                         for b in batches])
    all_mask = torch.cat([F.pad(b["attention_mask"], (0, T - b["attention_mask"].shape[1])) for b in batches])
    negatives = _hardest_negatives(image_embed @ text_embed.T, same.to(device))
    generator = torch.Generator(device).manual_seed(seed)
    counts = {"itm_correct": 0, "itm_total": 0, "mlm_correct": 0, "mlm_total": 0}
    for batch in tqdm(batches, desc="itm+mlm", disable=not progress, leave=False):
        ids, mask, index = batch["input_ids"], batch["attention_mask"], batch["index"]
        regions = model.encode_image(batch["pixel_values"])
        neg_ids, neg_mask = all_ids[negatives[index]], all_mask[negatives[index]]
        logits = torch.cat([model.itm_logits(model.fuse(regions, model.encode_text(ids, mask), mask)),
                            model.itm_logits(model.fuse(regions, model.encode_text(neg_ids, neg_mask), neg_mask))])
        labels = torch.cat([torch.ones(len(ids)), torch.zeros(len(ids))]).long().to(device)
        counts["itm_correct"] += int((logits.argmax(-1) == labels).sum())
        counts["itm_total"] += len(labels)
        masked, targets = mask_tokens(ids, mask, special_ids=tokenizer.special_ids, mask_id=tokenizer.mask_id,
                                      vocab_size=tokenizer.vocab_size, generator=generator)
        fused = model.fuse(regions, model.encode_text(masked, mask), mask)
        chosen = targets != IGNORE_INDEX
        counts["mlm_correct"] += int((model.mlm_logits(fused.words[chosen]).argmax(-1) == targets[chosen]).sum())
        counts["mlm_total"] += int(chosen.sum())
    return EncodedSplit(image_embed, text_embed, **counts)


def evaluate_retrieval(model: PersonaeModel, tokenizer: Tokenizer, manifest: PairManifest, *,
                       batch_size: int = 128, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """All retrieval metrics on a manifest (usually the test split).

    Captions of the built-in world can repeat exactly, so a retrieved item counts as correct when its
    caption is identical to the query's own caption.
    """
    model.eval()
    captions = [r.caption for r in manifest]
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    same = caption_id[:, None] == caption_id[None, :]  # (N, N)
    dataset = PairDataset(manifest, tokenizer, image_size=model.cfg.vision.image_size,
                          max_text_len=model.cfg.text.max_len, progress=progress)
    enc = _encode_split(model, dataset, tokenizer, same, batch_size, seed, progress)
    similarity = (enc.image_embed @ enc.text_embed.T).cpu()
    i2t, t2i = recall_at_k(similarity, same), recall_at_k(similarity.T, same)
    n = len(captions)
    result: dict[str, float] = {"pairs": n, "unique_captions": len(ids)}
    result |= {f"i2t_r@{k}": v for k, v in i2t.items()} | {f"t2i_r@{k}": v for k, v in t2i.items()}
    result |= {f"chance_r@{k}": min(1.0, k / n) for k in KS}
    result["itm_acc"] = enc.itm_correct / max(1, enc.itm_total)
    result["mlm_acc"] = enc.mlm_correct / max(1, enc.mlm_total)
    return result


def format_table(result: dict[str, float]) -> str:
    """A small fixed-width table of the retrieval metrics."""
    lines = [f"{'direction':<14}" + "".join(f"{'R@' + str(k):>8}" for k in KS)]
    for name, key in (("image->text", "i2t"), ("text->image", "t2i"), ("chance", "chance")):
        lines.append(f"{name:<14}" + "".join(f"{result[f'{key}_r@{k}']:>8.3f}" for k in KS))
    lines.append(f"ITM accuracy (positives vs hardest negatives): {result['itm_acc']:.3f}")
    lines.append(f"MLM accuracy (15% masked, image-conditioned):  {result['mlm_acc']:.3f}")
    lines.append(f"pairs: {result['pairs']}  unique captions: {result['unique_captions']}")
    return "\n".join(lines)


def save_result(result: dict[str, float], path: Path) -> Path:
    """Write the metrics as JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
