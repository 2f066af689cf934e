"""Hugging Face parts behind personae's interfaces (extra ``personae[hf]``): one import for all of them.

The causal-LM decoder lives in :mod:`personae.models.hf_decoder`, the vision and text towers in
:mod:`personae.models.hf_towers`; this module re-exports both so ``from personae.models.hf import ...``
keeps working.
"""

from personae.models.hf_decoder import EngineCache, HFDecoder, load_causal_lm
from personae.models.hf_towers import ConvVisionTower, HFTextTower, HFVisionTower, load_text_model, load_vision_model

__all__ = ["ConvVisionTower", "EngineCache", "HFDecoder", "HFTextTower", "HFVisionTower", "load_causal_lm",
           "load_text_model", "load_vision_model"]
