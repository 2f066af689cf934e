"""A local Hugging Face causal LM as personae's role-play decoder (``model.decoder.kind: hf``).

:class:`HFDecoder` has the own decoder's interface (``embed``, ``forward`` over embeddings with
positions, a padding mask and a :class:`~personae.models.cache.KVCache`, ``logits``,
``new_cache``), so :class:`~personae.models.model.PersonaeModel`, the role-play task and the one
generation engine run on it unchanged. The image regions pass through LLaVA-1.5's two-layer MLP
into the LM's hidden size and are placed as embeddings before the prompt.

The engine's cache reaches the LM through :class:`EngineCache`, a ``transformers.Cache`` whose
layers write each new key/value slice into the engine's pre-allocated per-layer tensors in place
and return the filled slice, so join / leave / compaction / the prefix cache need no change. The
mask is an explicit 4-D additive mask over the cache slots (causal, padding gaps masked; none
for a decode step of rows without gaps, where HF's own causal mask is all-ones), and positions are the engine's per-row positions. Rows never attend to a shared prompt head stored
once (``supports_shared_heads`` is off): each row holds its own copy of a cached card.

Nothing is downloaded: a folder without ``config.json``, or whose architecture is not a causal LM,
is refused naming the folder (:func:`load_causal_lm`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from personae.config import DecoderCfg
from personae.errors import DataError
from personae.models.cache import KVCache
from personae.models.hf_towers import read_model_config
from personae.models.layers import init_weights

__all__ = ["EngineCache", "HFDecoder", "load_causal_lm"]


def load_causal_lm(path: str | Path) -> PreTrainedModel:
    """The causal LM saved in local folder `path`; never downloads.

    Loaded in float32 (the rest of personae trains in float32; bf16 is autocast) with SDPA attention,
    which takes the engine's explicit 4-D masks.
    """
    folder = Path(path)
    model_type = read_model_config(str(path), "model.decoder.path").get("model_type", "")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DataError(f"model_type {model_type!r} in config.json is not a causal LM architecture that "
                        f"AutoModelForCausalLM loads (e.g. llama, qwen2, gpt2, gemma3_text)", folder)
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                attn_implementation="sdpa")


class _EngineLayer(CacheLayerMixin):
    """One layer's view of the engine's cache: new keys/values are written in place at slot `length`."""

    is_sliding = False

    def __init__(self, cache: KVCache, layer: int) -> None:
        super().__init__()
        self.engine, self.layer = cache, layer
        self.keys, self.values = cache.keys[layer], cache.values[layer]  # (B, H_kv, slots, d)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the engine allocated the tensors

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        start, new = self.engine.length, key_states.shape[-2]
        self.keys[:, :, start : start + new] = key_states
        self.values[:, :, start : start + new] = value_states
        return self.keys[:, :, : start + new], self.values[:, :, : start + new]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.engine.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.engine.length

    def get_max_length(self) -> int:
        return self.engine.capacity


class EngineCache(Cache):
    """A ``transformers.Cache`` over personae's :class:`KVCache` (the engine advances its ``length``)."""

    def __init__(self, cache: KVCache) -> None:
        super().__init__(layers=[_EngineLayer(cache, i) for i in range(cache.keys.shape[0])])


class HFDecoder(nn.Module):
    """A Hugging Face causal LM with a LLaVA-1.5 projector for image regions; see the module docstring."""

    def __init__(self, cfg: DecoderCfg, image_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm = load_causal_lm(cfg.path)
        cfg.path = str(Path(cfg.path).resolve())  # the run records where the folder is, whatever the working directory
        config = self.lm.config
        self.hidden = int(config.hidden_size)
        self.image_proj = nn.Sequential(nn.Linear(image_width, self.hidden), nn.GELU(),
                                        nn.Linear(self.hidden, self.hidden))
        self.image_proj.apply(init_weights)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit is not None and cfg.max_len > limit:
            raise DataError(f"model.decoder.max_len={cfg.max_len} is more than the LM's {limit} positions",
                            cfg.path)
        window = getattr(config, "sliding_window", None) if _uses_sliding_window(config) else None
        if window is not None and cfg.max_len > window:
            # the engine's explicit mask is full causal attention: equal to the LM's only within its window
            raise DataError(f"model.decoder.max_len={cfg.max_len} is more than the LM's sliding window "
                            f"{window}; set max_len <= {window}", cfg.path)

    @property
    def max_len(self) -> int:
        return self.cfg.max_len

    @property
    def _layers(self) -> int:
        return int(self.lm.config.num_hidden_layers)

    def new_cache(self, batch: int, max_len: int | None = None, *, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty cache for `batch` sequences of up to max_len (default cfg.max_len) positions."""
        config = self.lm.config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or self.hidden // heads)
        return KVCache.empty(self._layers, batch, kv_heads, max_len or self.cfg.max_len, head_dim,
                             device=device, dtype=dtype)

    def embed(self, input_ids: torch.Tensor, image_regions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and optional (B, R, Dv) regions -> (B, R+T, D) input embeddings."""
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D); Gemma's scaled embedding scales here
        if image_regions is None:
            return tokens
        return torch.cat([self.image_proj(image_regions).to(tokens.dtype), tokens], dim=1)

    def forward(self, embeddings: torch.Tensor, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Causal pass over (B, T, D) embeddings -> (B, T, D) final hidden states (after the LM's norm).

        positions (B, T) (default: cache.length + arange(T)); attention_mask (B, S) bool marks real
        (not padding) slots over the cached + new positions.
        """
        B, T, _ = embeddings.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_len:
            raise ValueError(f"sequence of {start + T} positions exceeds model.decoder.max_len={self.cfg.max_len}")
        if positions is None:
            positions = torch.arange(start, start + T, device=embeddings.device).expand(B, T)
        mask = None  # one new token per row and no gaps: it attends to every slot, and HF needs no mask
        if attention_mask is not None or (cache is not None and T > 1):
            mask = _additive_mask(B, T, start, attention_mask, embeddings.device, embeddings.dtype)
        out = self.lm.base_model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions,
                                 cache=EngineCache(cache) if cache is not None else None,
                                 use_cache=cache is not None)
        if cache is not None:
            cache.length = start + T
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) with the LM's own head (and Gemma's final logit soft-capping)."""
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _uses_sliding_window(config: object) -> bool:
    """Whether some layer of the LM attends only within a sliding window."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return True
    return bool(getattr(config, "use_sliding_window", False))


def _additive_mask(B: int, T: int, start: int, real: torch.Tensor | None, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, start+T) additive mask: 0 where a query may attend (causal over slots, real keys), else -inf-ish.

    A padded query row would see nothing; it sees itself, so attention gives no NaN.
    """
    S = start + T
    allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)[None, None]  # (1, 1, T, S)
    if real is not None:
        allowed = allowed & real[:, None, None, :S].bool()
        eye = torch.zeros(T, S, dtype=torch.bool, device=device)
        eye[torch.arange(T), start + torch.arange(T)] = True
        allowed = allowed | eye[None, None]
    allowed = allowed.expand(B, 1, T, S)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
