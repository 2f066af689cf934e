"""Models: encoders, fusion, heads and the composed PersonaeModel."""

from personae.models.fusion import FUSIONS, CrossModalAttention, FusionOutput
from personae.models.model import EncoderOutput, PersonaeModel

__all__ = ["FUSIONS", "CrossModalAttention", "EncoderOutput", "FusionOutput", "PersonaeModel"]
