"""Objectives: each an nn.Module returning a dict of named losses (loss_*) and metrics."""

from personae.objectives.alignment import RegionWordAlignment
from personae.objectives.contrastive import ContrastiveLoss
from personae.objectives.language_model import LanguageModelling
from personae.objectives.masked_lm import MaskedLanguageModelling, mask_tokens
from personae.objectives.matching import ImageTextMatching, sample_hard_negatives

OBJECTIVES = {
    "itc": ContrastiveLoss, "itm": ImageTextMatching, "mlm": MaskedLanguageModelling, "lm": LanguageModelling,
}

__all__ = [
    "OBJECTIVES", "ContrastiveLoss", "LanguageModelling", "ImageTextMatching", "MaskedLanguageModelling",
    "RegionWordAlignment", "mask_tokens", "sample_hard_negatives",
]
