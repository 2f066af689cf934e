"""Tiny random Hugging Face model folders (hidden 32, two layers) for the tower, run and preset tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                  "{{ m['content'] }}<|eot_id|>{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA_SPECIALS = ["<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def clip_folder(path: Path, *, image_size: int = 32, patch_size: int = 8, processor: bool = True) -> Path:
    """A CLIPVisionModel folder; with `processor`, a preprocessor_config.json of other statistics than CLIP's."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**SMALL, image_size=image_size, patch_size=patch_size)
    transformers.CLIPVisionModel(config).save_pretrained(path)
    if processor:
        _processor(path, {"crop_size": {"height": image_size, "width": image_size},
                          "size": {"shortest_edge": image_size}, "do_center_crop": True,
                          "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    return Path(path)


def siglip_folder(path: Path, *, image_size: int = 32, patch_size: int = 8) -> Path:
    """A SiglipVisionModel folder (attention-pool head) with SigLIP's 0.5 / 0.5 statistics."""
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(**SMALL, image_size=image_size, patch_size=patch_size)
    transformers.SiglipVisionModel(config).save_pretrained(path)
    _processor(path, {"size": {"height": image_size, "width": image_size},
                      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    return Path(path)


def bert_folder(path: Path, *, max_positions: int = 64) -> Path:
    """A BERT folder whose WordPiece vocabulary spells any lower-case text letter by letter."""
    pieces = [*string.ascii_lowercase, *string.digits, *string.punctuation]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{p}" for p in pieces)]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), **SMALL, max_position_embeddings=max_positions)
    transformers.BertModel(config).save_pretrained(path)
    return Path(path)


def llama_folder(path: Path, words: list[str]) -> Path:
    """A Llama causal LM with a word-level tokenizer (Llama-3's chat markers and template)."""
    settings = {**SMALL, "num_key_value_heads": 2, "max_position_embeddings": 4096}
    return _causal_lm_folder(path, words, LLAMA_SPECIALS, LLAMA_TEMPLATE, transformers.LlamaConfig, settings, bos=True)


def gpt2_folder(path: Path, words: list[str]) -> Path:
    """A GPT-2 causal LM (its lm_head tied to wte) with a word-level tokenizer and a ChatML template."""
    settings = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 4096,
                "bos_token_id": 1, "eos_token_id": 1}  # <|endoftext|>, not GPT-2's 50256
    return _causal_lm_folder(path, words, CHATML_SPECIALS, CHATML_TEMPLATE, transformers.GPT2Config, settings,
                             bos=False)


def gemma3_folder(path: Path, words: list[str]) -> Path:
    """A Gemma-3 text LM (embeddings tied to its head) with a word-level tokenizer and Gemma's turn markers."""
    settings = {**SMALL, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 1024,
                "max_position_embeddings": 4096}
    return _causal_lm_folder(path, words, GEMMA_SPECIALS, GEMMA_TEMPLATE, transformers.Gemma3TextConfig, settings,
                             bos=True)


def qwen2_folder(path: Path) -> Path:
    """A Qwen2 LM with a byte-level BPE of no merges (one token per byte; transformers rebuilds a Qwen2 folder's
    tokenizer as Qwen2's byte-level BPE, so a word-level one would not survive the round trip) and ChatML."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate([*CHATML_SPECIALS, *bytes_to_unicode().values()])}
    tokenizer = transformers.Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIALS})
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), **SMALL, num_key_value_heads=2,
                                      max_position_embeddings=4096)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def _causal_lm_folder(path: Path, words: list[str], specials: list[str], template: str,
                      config_class: type[transformers.PretrainedConfig], settings: dict, *, bos: bool) -> Path:
    """A random causal LM (`config_class(**settings)`, vocabulary sized to the tokenizer) and a word-level tokenizer."""
    vocab = {token: i for i, token in enumerate(["[UNK]", *specials, "\n", "\n\n", " ", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tokenizer.bos_token = specials[0]
    tokenizer.chat_template = template
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), **settings)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def _processor(path: Path, settings: dict) -> None:
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(settings), encoding="utf-8")
