"""Tests for the tokenizer: training, special tokens, round trips, HF folders, padding."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from personae.data.tokenizer import ROLES, SPECIAL_TOKENS, Tokenizer, pad_ids, train_tokenizer
from personae.errors import DataError

CORPUS = [
    "a dog on the beach",
    "a cat under the table",
    "The Knight draws her sword.",
    "café, naïve, jalapeño",
    "hello 😀 world",
] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=320)


def test_special_ids_and_pad_zero(tok: Tokenizer) -> None:
    assert len(SPECIAL_TOKENS) == len(ROLES) == len(set(SPECIAL_TOKENS))
    assert tok.pad_id == 0
    ids = [tok.pad_id, tok.cls_id, tok.eos_id, tok.mask_id, tok.image_id, tok.system_id,
           tok.user_id, tok.char_id]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert tok.special_ids == frozenset(ids)
    assert [tok.id_to_token(i) for i in ids] == list(SPECIAL_TOKENS)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 320 and len(tok) == tok.vocab_size


def test_special_tokens_are_never_split(tok: Tokenizer) -> None:
    for token in SPECIAL_TOKENS:
        assert tok.encode(token, add_cls=False) == [tok.token_to_id(token)]
        glued = tok.encode(f"x{token}y", add_cls=False)
        assert tok.token_to_id(token) in glued and len(glued) == 3
    plain = tok.encode("<user>", add_cls=False, parse_special=False)
    assert tok.user_id not in plain and len(plain) > 1
    assert tok.decode(plain) == "<user>"  # untrusted text survives as text
    copy = pickle.loads(pickle.dumps(tok))  # as in a DataLoader worker
    assert copy.encode("<user>", add_cls=False, parse_special=False) == plain
    assert copy.encode("<user>", add_cls=False) == [tok.user_id]


@pytest.mark.parametrize("text", ["a dog on the beach", "Émile 😀🐕‍🦺 naïve 漢字 ½", "  two  spaces\n", ""])
def test_utf8_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_eos=True)
    assert ids[0] == tok.cls_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text


def test_case_is_kept(tok: Tokenizer) -> None:
    assert tok.encode("The") != tok.encode("the")
    assert tok.decode(tok.encode("The Knight")) == "The Knight"


def test_truncation_keeps_cls_and_eos(tok: Tokenizer) -> None:
    ids = tok.encode("a dog on the beach " * 10, max_length=6, add_eos=True)
    assert len(ids) == 6 and ids[0] == tok.cls_id and ids[-1] == tok.eos_id
    assert tok.encode("a dog", add_cls=False) == tok.encode("a dog")[1:]
    with pytest.raises(ValueError, match="no room"):
        tok.encode("x", max_length=1, add_eos=True)


def test_encode_batch_padding(tok: Tokenizer) -> None:
    texts = ["a dog", "a cat under the table", ""]
    ids, mask = tok.encode_batch(texts)
    lengths = [len(tok.encode(t)) for t in texts]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (3, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (ids[~mask] == tok.pad_id).all()
    assert tok.decode_batch(ids) == texts
    fixed, fixed_mask = tok.encode_batch(texts, max_length=12, pad_to_max_length=True)
    assert fixed.shape == (3, 12) and fixed_mask.sum(1).tolist() == lengths
    with pytest.raises(ValueError, match="longer than length"):
        pad_ids([[1, 2, 3]], 0, length=2)


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "tokenizer.json")
    assert path.is_file() and (tmp_path / "tokenizer_config.json").is_file()
    back = Tokenizer.from_file(path)
    assert Tokenizer.from_file(tmp_path).vocab_size == tok.vocab_size  # a folder works too
    for text in CORPUS[:5]:
        assert back.encode(text, add_eos=True) == tok.encode(text, add_eos=True)
    assert back.role_tokens == tok.role_tokens
    assert back.special_ids == tok.special_ids


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer.json not found"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(DataError, match="cannot load tokenizer"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    bert_dir = _write_bert_dir(tmp_path / "bert")
    with pytest.raises(DataError, match="from_pretrained_dir"):
        Tokenizer.from_file(bert_dir / "tokenizer.json")  # HF roles are not ours


def test_vocab_size_floor() -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 264"):
        train_tokenizer(CORPUS, vocab_size=100)


def _write_bert_dir(directory: Path) -> Path:
    """A tiny WordPiece (BERT-like) tokenizer folder, as transformers would save it."""
    words = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "the", "beach", "##s"]
    backend = BackendTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.add_special_tokens(["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"])
    directory.mkdir(parents=True)
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        backend.save(str(directory / "tokenizer.json"))
        config = {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]", "unk_token": "[UNK]"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        fast.save_pretrained(str(directory))
    return directory


def test_hf_dir_maps_and_adds_specials(tmp_path: Path) -> None:
    directory = _write_bert_dir(tmp_path / "bert")
    hf = Tokenizer.from_pretrained_dir(directory)
    assert (hf.pad_id, hf.cls_id, hf.eos_id, hf.mask_id) == (1, 2, 3, 4)  # its own ids are kept
    added = [hf.image_id, hf.system_id, hf.user_id, hf.char_id]
    assert sorted(added) == [11, 12, 13, 14] and hf.vocab_size == 15
    assert hf.role_tokens["image"] == "<image>" and hf.role_tokens["eos"] == "[SEP]"
    ids = hf.encode("a dog on the beach<image>", add_eos=True)
    assert ids == [2, 5, 6, 7, 8, 9, hf.image_id, 3]
    assert hf.decode(ids) == "a dog on the beach"
    out = tmp_path / "ckpt"
    out.mkdir()
    hf.save(out)
    again = Tokenizer.from_file(out / "tokenizer.json")
    assert again.role_tokens == hf.role_tokens and again.encode("dogs") == hf.encode("dogs")
    assert Tokenizer.from_pretrained_dir(out).special_ids == hf.special_ids


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="only 'fast' tokenizers"):
        Tokenizer.from_pretrained_dir(tmp_path)
