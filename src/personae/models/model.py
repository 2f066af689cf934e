"""The composed multimodal model: encode_image / encode_text / fuse and the ITC, ITM, MLM heads."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from personae.config import ConfigError, DecoderCfg, ModelCfg, TextCfg, VisionCfg
from personae.data.tokenizer import Tokenizer
from personae.models.cache import KVCache
from personae.models.decoder import Decoder
from personae.models.fusion import FusionOutput, build_fusion
from personae.models.generation import Generation, SamplingParams, generate
from personae.models.layers import init_weights
from personae.models.lora import LORA_MARKERS, add_decoder_lora
from personae.models.text import TextEncoder
from personae.models.vision import VisionEncoder, pool_regions

# CLIP's bound exp(logit_scale) <= 100, kept on the parameter after each optimiser step
MAX_LOGIT_SCALE = math.log(100.0)


def _own_decoder(cfg: DecoderCfg, vocab_size: int, image_width: int, dropout: float) -> nn.Module:
    return Decoder(cfg, vocab_size, image_width, dropout)


def _hf_decoder(cfg: DecoderCfg, vocab_size: int, image_width: int, dropout: float) -> nn.Module:
    # imported here, not at the top: transformers is the optional extra personae[hf]
    try:
        from personae.models.hf_decoder import HFDecoder
    except ImportError as error:
        raise ImportError("model.decoder.kind 'hf' needs transformers: pip install 'personae[hf]'") from error
    return HFDecoder(cfg, image_width)  # its vocabulary and dropout are the LM's own


# model.decoder.kind -> builder(cfg, vocab_size, image_width, dropout); keys = config.DECODER_KINDS
DECODERS = {"own": _own_decoder, "hf": _hf_decoder}
PRETRAINED_DECODERS = frozenset({"hf"})  # kinds whose weights come from a folder (not re-initialised here)


def _hf_towers() -> ModuleType:
    """personae.models.hf_towers, imported here, not at the top: transformers is the extra personae[hf]."""
    try:
        from personae.models import hf_towers
    except ImportError as error:
        raise ImportError("a Hugging Face tower (model.vision.kind clip / siglip, model.text.kind hf) needs "
                          "transformers: pip install 'personae[hf]'") from error
    return hf_towers


def _hf_vision(cfg: VisionCfg, dropout: float) -> nn.Module:
    return _hf_towers().HFVisionTower(cfg)  # its dropout is the folder's own


def _efficientnet(cfg: VisionCfg, dropout: float) -> nn.Module:
    _hf_towers()  # the same extra: ConvVisionTower lives beside the HF towers
    from personae.models.efficientnet import build_efficientnet_tower
    return build_efficientnet_tower(cfg)  # no dropout inside (the Lite classifier's is not part of the tower)


def _hf_text(cfg: TextCfg, dropout: float) -> nn.Module:
    return _hf_towers().HFTextTower(cfg)  # its dropout is the folder's own


# model.vision.kind -> builder(cfg, dropout); keys = config.VISION_KINDS. A pretrained tower writes
# the config's image_size / patch_size / width from its folder; every tower has `grid` (regions a side).
VISION_TOWERS = {"own": VisionEncoder, "clip": _hf_vision, "siglip": _hf_vision, "efficientnet": _efficientnet}
# model.text.kind -> builder(cfg, dropout); keys = config.TEXT_KINDS
TEXT_TOWERS = {"own": TextEncoder, "hf": _hf_text}
PRETRAINED_VISION = frozenset({"clip", "siglip", "efficientnet"})  # kinds whose weights come from a folder
PRETRAINED_TEXT = frozenset({"hf"})


@dataclass
class EncoderOutput:
    """Unimodal features and the normalised ITC embeddings of a batch of image-text pairs."""

    regions: torch.Tensor  # (B, 1+N, Dv)
    words: torch.Tensor  # (B, T, Dt)
    image_embed: torch.Tensor  # (B, E), unit norm
    text_embed: torch.Tensor  # (B, E), unit norm
    logit_scale: torch.Tensor  # () = 1 / temperature


class MLMHead(nn.Module):
    """Dense -> GELU -> LayerNorm -> logits over the vocabulary, tied to the word embeddings."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, words: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # the embedding matrix is passed in, not registered here, so it is stored once
        x = self.ln(F.gelu(self.dense(words)))
        return F.linear(x, word_embeddings, self.bias)  # (..., V)


class PersonaeModel(nn.Module):
    """Image tower, text tower, fusion, and the heads of the three pretraining objectives."""

    def __init__(self, cfg: ModelCfg) -> None:
        super().__init__()
        self.cfg = cfg
        # pretrained towers are built first (they write their widths into cfg) and kept out of the init below
        vision_pretrained, text_pretrained = cfg.vision.kind in PRETRAINED_VISION, cfg.text.kind in PRETRAINED_TEXT
        vision = VISION_TOWERS[cfg.vision.kind](cfg.vision, cfg.dropout)
        text = TEXT_TOWERS[cfg.text.kind](cfg.text, cfg.dropout)
        self.vision = nn.Identity() if vision_pretrained else vision
        self.text = nn.Identity() if text_pretrained else text
        width = cfg.text.width  # fusion runs at the text width
        if width % cfg.fusion.heads:  # said here: a pretrained text tower sets the width from its folder
            raise ConfigError(f"model.fusion.heads={cfg.fusion.heads} does not divide the fusion width {width} "
                              f"(model.text.width{', the hidden size of model.text.path' if text_pretrained else ''})")
        self.region_adapter = nn.Identity() if cfg.vision.width == width else nn.Linear(cfg.vision.width, width)
        grid = vision.grid // cfg.fusion.region_pool
        self.fusion = build_fusion(cfg.fusion, width, 1 + grid * grid, cfg.text.max_len, cfg.dropout)
        self.image_proj = nn.Linear(cfg.vision.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = MLMHead(width, cfg.text.vocab_size)
        self.decoder = None
        build = DECODERS[cfg.decoder.kind]
        pretrained = cfg.decoder.kind in PRETRAINED_DECODERS  # added after the init: its weights are the folder's
        if cfg.decoder.enabled and not pretrained:
            self.decoder = build(cfg.decoder, cfg.text.vocab_size, cfg.vision.width, cfg.dropout)
        self.apply(init_weights)
        self.vision, self.text = vision, text
        for tower in self._locked_towers():  # LiT and its mirror image: fixed, and kept in eval mode by train()
            tower.requires_grad_(False).eval()
        if cfg.decoder.enabled and pretrained:
            self.decoder = build(cfg.decoder, cfg.text.vocab_size, cfg.vision.width, cfg.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(min(math.log(1.0 / cfg.init_temperature), MAX_LOGIT_SCALE)))
        if cfg.lora_rank > 0:  # a run that carries LoRA (meta-trained) is rebuilt with it before loading
            if self.decoder is None:
                raise ValueError("model.lora_rank > 0 puts LoRA adapters on the decoder, but model.decoder.enabled "
                                 "is false")
            add_decoder_lora(self, cfg.lora_rank, cfg.lora_alpha)
        if self.decoder is not None and cfg.decoder.locked:
            self.lock_decoder()

    def lock_parts(self, cfg: ModelCfg) -> None:
        """Lock what `cfg` (a later stage's model section) says is locked: model.vision / text / decoder.locked.

        One way only: a part this model was built locked stays locked. The towers' flags are copied
        into the model's own config, so train() keeps them in eval mode.
        """
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if getattr(cfg, name).locked:
                getattr(self.cfg, name).locked = True
                tower.requires_grad_(False).eval()
        if cfg.decoder.locked and self.decoder is not None:
            self.cfg.decoder.locked = True
            self.lock_decoder()

    def lock_decoder(self) -> None:
        """model.decoder.locked: the decoder's weights fixed except its image projector and LoRA adapters.

        Adapters added later (meta-training, adaptation) are new parameters and train as well.
        """
        self.decoder.requires_grad_(False)
        self.decoder.image_proj.requires_grad_(True)
        for name, param in self.decoder.named_parameters():
            if name.rsplit(".", 1)[-1] in LORA_MARKERS:
                param.requires_grad_(True)

    def _locked_towers(self) -> list[nn.Module]:
        """The towers whose config says locked (model.vision.locked, model.text.locked)."""
        return [tower for tower, cfg in ((self.vision, self.cfg.vision), (self.text, self.cfg.text)) if cfg.locked]

    def train(self, mode: bool = True) -> PersonaeModel:
        """nn.Module.train, except that a locked tower stays in eval mode (no dropout)."""
        super().train(mode)
        for tower in self._locked_towers():
            tower.eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1+N, Dv) image regions."""
        return self.vision(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, T, Dt) word features."""
        return self.text(input_ids, attention_mask)

    def image_embed(self, regions: torch.Tensor) -> torch.Tensor:
        """Unit-norm ITC embedding (B, E) of region 0: the cls region, or a pretrained tower's pooled output."""
        return F.normalize(self.image_proj(regions[:, 0]), dim=-1)

    def text_embed(self, words: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-norm ITC embedding (B, E) of the text pooled by model.text.pooling (cls word or mean of real words)."""
        if self.cfg.text.pooling == "cls":
            pooled = words[:, 0]
        elif attention_mask is None:
            pooled = words.mean(dim=1)
        else:
            real = attention_mask[..., None].to(words.dtype)  # (B, T, 1)
            pooled = (words * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) = 1 / temperature; at most 100 because the trainer calls clamp_logit_scale_."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Pull logit_scale back to MAX_LOGIT_SCALE; called after each optimiser step (as open_clip does).

        A clamp in the forward pass instead has a zero gradient above the bound, so a scale that once
        passed 100 could never come back down.
        """
        self.logit_scale.clamp_(max=MAX_LOGIT_SCALE)

    def fuse(
        self, regions: torch.Tensor, words: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> FusionOutput:
        """Fuse image regions (pooled by fusion.region_pool) with words of the same batch size."""
        regions = pool_regions(regions, self.cfg.fusion.region_pool)
        return self.fusion(self.region_adapter(regions), words, attention_mask)

    def itm_logits(self, fused: FusionOutput) -> torch.Tensor:
        """(B, 2) match / no-match logits from the fused cls; class 1 means 'matches'."""
        return self.itm_head(fused.cls)

    def mlm_logits(self, fused_words: torch.Tensor) -> torch.Tensor:
        """(..., D) fused word features -> (..., V) vocabulary logits."""
        return self.mlm_head(fused_words, self.text.word_embeddings)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> EncoderOutput:
        """Encode a batch of pairs: features and ITC embeddings (the objectives do the rest)."""
        regions = self.encode_image(pixel_values)
        words = self.encode_text(input_ids, attention_mask)
        return EncoderOutput(
            regions=regions,
            words=words,
            image_embed=self.image_embed(regions),
            text_embed=self.text_embed(words, attention_mask),
            logit_scale=self.scale(),
        )

    # ---- role-play decoder -------------------------------------------------------------------

    def require_decoder(self) -> Decoder:
        """The role-play decoder; a clear error for a pretrained-only model, which has none."""
        if self.decoder is None:
            raise ValueError("this model has no decoder (model.decoder.enabled is false): fine-tune it first")
        return self.decoder

    def init_decoder_from_text(self) -> None:
        """Seed the decoder with the pretrained text tower: word embeddings and, where shapes agree, blocks."""
        decoder = self.require_decoder()
        if not isinstance(decoder, Decoder) or not isinstance(self.text, TextEncoder):
            return  # a pretrained (HF) decoder keeps its own weights; a pretrained text tower has other shapes
        with torch.no_grad():
            if decoder.tok_embed.weight.shape == self.text.tok_embed.weight.shape:
                decoder.tok_embed.weight.copy_(self.text.tok_embed.weight)
            for target, source in zip(decoder.blocks, self.text.blocks):
                own, seed = target.state_dict(), source.state_dict()
                if all(key in own and own[key].shape == value.shape for key, value in seed.items()):
                    target.load_state_dict(seed, strict=False)  # a token shift's mix keeps its identity start

    def image_prefix_length(self) -> int:
        """How many decoder positions the image takes (cls + the pooled patch grid)."""
        grid = self.vision.grid // self.cfg.decoder.image_pool
        return 1 + grid * grid

    def text_budget(self, reserve: int = 0, with_image: bool = True) -> int:
        """Decoder positions left for prompt text after the image prefix and `reserve` reply tokens."""
        return self.cfg.decoder.max_len - (self.image_prefix_length() if with_image else 0) - reserve

    def image_prefix(self, pixel_values: torch.Tensor | None) -> torch.Tensor | None:
        """Regions the decoder sees: the cls region and the patch grid average-pooled by image_pool."""
        if pixel_values is None:
            return None
        return pool_regions(self.encode_image(pixel_values), self.cfg.decoder.image_pool)

    def lm_states(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder pass over [image regions; tokens] -> (B, T, D) states of the tokens and
        (B, R, D) the projected image prefix it read (R = 0 without an image)."""
        decoder = self.require_decoder()
        embeddings = decoder.embed(input_ids, self.image_prefix(pixel_values))  # (B, R+T, D)
        hidden = decoder(embeddings)  # right padding needs no mask
        regions = embeddings.shape[1] - input_ids.shape[1]
        return hidden[:, regions:], embeddings[:, :regions]

    def lm_hidden(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder pass over [image regions; tokens] -> (B, T, D) states of the tokens."""
        return self.lm_states(pixel_values, input_ids)[0]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) decoder states -> (..., V) next-token logits."""
        return self.require_decoder().logits(hidden)

    def lm_logits(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) next-token logits after each token (image prefix first when given)."""
        return self.lm_head(self.lm_hidden(pixel_values, input_ids))

    # ---- the generation engine's interface (personae.models.generation.CausalLM) -------------

    @property
    def supports_shared_heads(self) -> bool:
        """Whether the decoder attends to a prompt head stored once for many rows (KVCache.shared): the own one does."""
        return isinstance(self.decoder, Decoder)

    @property
    def max_positions(self) -> int:
        """Decoder positions a sequence may take (image prefix, prompt and reply)."""
        return self.cfg.decoder.max_len

    def embed_prompt(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and optional (B, 3, S, S) images -> (B, R+T, D) decoder input embeddings."""
        return self.require_decoder().embed(input_ids, self.image_prefix(pixel_values))

    def decode(self, embeddings: torch.Tensor, positions: torch.Tensor | None, attention_mask: torch.Tensor | None,
               cache: KVCache) -> torch.Tensor:
        """Causal pass of (B, T, D) embeddings that reads and extends `cache` -> (B, T, D) states."""
        return self.require_decoder()(embeddings, positions, attention_mask, cache)

    def new_cache(self, batch: int, slots: int, *, device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty cache for `batch` rows of up to `slots` positions."""
        return self.require_decoder().new_cache(batch, slots, device=device, dtype=dtype)

    def generate(self, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], pixel_values: torch.Tensor | None,
                 params: SamplingParams) -> list[Generation]:
        """Decode prompts (token ids) with optional images (B, 3, S, S) to finished replies."""
        return generate(self, tokenizer, prompts, pixel_values, params)
