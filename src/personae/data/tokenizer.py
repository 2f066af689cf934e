"""Tokenizer: a byte-level BPE trained by personae, or a Hugging Face ``tokenizer.json`` folder.

The model needs a fixed set of special tokens, by *role*: ``pad``, ``cls``, ``eos``, ``mask``,
``image`` and the chat roles ``system``, ``user``, ``char``. A tokenizer trained here uses the
strings in :data:`SPECIAL_TOKENS` with ids ``0..7`` (so the padding id is 0). A Hugging Face
tokenizer keeps its own ids: its pad/mask/cls/eos tokens are mapped to our roles, and the roles
it lacks are added as new special tokens at the end of its vocabulary.

Special tokens are single ids and are never split. By default (``parse_special=True``) a special
string written in the text, e.g. ``"<user>"``, is encoded as that token; pass
``parse_special=False`` for untrusted text (chat messages) so that it is encoded as plain text.

:meth:`Tokenizer.save` writes ``tokenizer.json`` and, beside it, a ``tokenizer_config.json``
recording which token plays which role; :meth:`Tokenizer.from_file` reads both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from personae.errors import DataError
from personae.files import write_text_atomic

__all__ = [
    "SPECIAL_TOKENS",
    "ROLES",
    "Tokenizer",
    "train_tokenizer",
    "pad_ids",
]

logger = logging.getLogger(__name__)

# Order matters: a trained tokenizer gives these ids 0..7, so "<pad>" is id 0.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<cls>",
    "<eos>",
    "<mask>",
    "<image>",
    "<system>",
    "<user>",
    "<char>",
)
ROLES: tuple[str, ...] = ("pad", "cls", "eos", "mask", "image", "system", "user", "char")
_DEFAULT_ROLE_TOKENS: dict[str, str] = dict(zip(ROLES, SPECIAL_TOKENS))
# Hugging Face tokenizer_config.json / special_tokens_map.json keys that fill each role, in order.
_HF_ROLE_KEYS: dict[str, tuple[str, ...]] = {
    "pad": ("pad_token",),
    "cls": ("cls_token", "bos_token"),
    "eos": ("eos_token", "sep_token"),
    "mask": ("mask_token",),
}
_CONFIG_NAME = "tokenizer_config.json"
_ROLES_KEY = "personae_roles"


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with personae's special-token roles and tensor helpers."""

    def __init__(self, backend: tokenizers.Tokenizer, roles: Mapping[str, str] | None = None):
        unknown = set(roles or {}) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown special-token roles {sorted(unknown)}; valid: {ROLES}")
        backend.no_truncation()  # we frame and truncate ourselves, identically for every backend
        backend.no_padding()
        self._backend = backend
        self._roles = {**_DEFAULT_ROLE_TOKENS, **(roles or {})}
        missing = [tok for tok in self._roles.values() if backend.token_to_id(tok) is None]
        if missing:
            raise ValueError(f"special tokens {missing} are not in the tokenizer's vocabulary")
        # Marking them special (ids unchanged) makes sure they are matched whole, never split.
        backend.add_special_tokens(list(dict.fromkeys(self._roles.values())))
        self._role_ids = {role: backend.token_to_id(tok) for role, tok in self._roles.items()}
        self._plain: tokenizers.Tokenizer | None = None

    # ----------------------------------------------------------------- loading and saving
    @classmethod
    def from_file(cls, path: str | PathLike[str]) -> Tokenizer:
        """Load a ``tokenizer.json`` saved by :meth:`save` (roles from the config beside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        backend = _load_backend(path)
        roles = _saved_roles(_read_json(path.parent / _CONFIG_NAME), path.parent / _CONFIG_NAME)
        roles = {role: roles.get(role, _DEFAULT_ROLE_TOKENS[role]) for role in ROLES}
        missing = [role for role, tok in roles.items() if backend.token_to_id(tok) is None]
        if missing:
            raise DataError(
                f"tokenizer has no token for role(s) {missing}; a tokenizer.json that came from a "
                f"Hugging Face folder needs its {_CONFIG_NAME} beside it, or load the folder with "
                "Tokenizer.from_pretrained_dir",
                path,
            )
        return cls(backend, roles)

    @classmethod
    def from_pretrained_dir(cls, directory: str | PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (needs ``tokenizer.json``), mapping its specials.

        pad <- pad_token, mask <- mask_token, cls <- cls_token or bos_token, eos <- eos_token or
        sep_token; roles with no token get our string from :data:`SPECIAL_TOKENS`, added as new
        special tokens (the vocabulary grows: resize the embeddings of a pretrained model).
        """
        directory = Path(directory)
        backend = _load_backend(directory / "tokenizer.json")
        config = {
            **_read_json(directory / "special_tokens_map.json"),
            **_read_json(directory / _CONFIG_NAME),
        }
        roles = _saved_roles(config, directory / _CONFIG_NAME) or _roles_from_hf(config, backend)
        for role in ROLES:
            roles.setdefault(role, _DEFAULT_ROLE_TOKENS[role])
        absent = [tok for tok in roles.values() if backend.token_to_id(tok) is None]
        if absent:
            logger.info("%s: adding special tokens %s", directory, absent)
            backend.add_special_tokens(list(dict.fromkeys(absent)))
        return cls(backend, roles)

    def save(self, path: str | PathLike[str]) -> Path:
        """Write ``tokenizer.json`` (``path`` may be a folder) and the role map beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self._backend.to_str(pretty=True))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "pad_token": self._roles["pad"],
            "mask_token": self._roles["mask"],
            "cls_token": self._roles["cls"],
            "bos_token": self._roles["cls"],
            "eos_token": self._roles["eos"],
            _ROLES_KEY: dict(self._roles),
        }
        write_text_atomic(path.parent / _CONFIG_NAME, json.dumps(config, indent=2, ensure_ascii=False))
        return path

    # ------------------------------------------------------------------------ encoding
    def encode(
        self,
        text: str,
        *,
        max_length: int | None = None,
        add_cls: bool = True,
        add_eos: bool = False,
        parse_special: bool = True,
    ) -> list[int]:
        """Token ids of ``text``: ``[cls] + body + [eos]``, the body cut to fit ``max_length``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        _check_unicode(text)
        backend = self._backend if parse_special else self._plain_backend()
        body = backend.encode(text, add_special_tokens=False).ids
        return self._frame(body, max_length, add_cls, add_eos)

    def encode_many(
        self,
        texts: Iterable[str],
        *,
        max_length: int | None = None,
        add_cls: bool = True,
        add_eos: bool = False,
        parse_special: bool = True,
    ) -> list[list[int]]:
        """:meth:`encode` over many texts (batched in Rust); returns unpadded id lists."""
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"encode_many expects strs, got {type(bad).__name__}")
        for text in texts:
            _check_unicode(text)
        backend = self._backend if parse_special else self._plain_backend()
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [self._frame(e.ids, max_length, add_cls, add_eos) for e in encodings]

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        *,
        pad_to_max_length: bool = False,
        add_cls: bool = True,
        add_eos: bool = False,
        parse_special: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad: ``(input_ids (B, T) long, attention_mask (B, T) bool)``.

        T is the longest sequence, or ``max_length`` when ``pad_to_max_length`` is set.
        """
        if pad_to_max_length and max_length is None:
            raise ValueError("pad_to_max_length=True needs max_length")
        ids = self.encode_many(
            texts,
            max_length=max_length,
            add_cls=add_cls,
            add_eos=add_eos,
            parse_special=parse_special,
        )
        return pad_ids(ids, self.pad_id, length=max_length if pad_to_max_length else None)

    def _frame(
        self, body: list[int], max_length: int | None, add_cls: bool, add_eos: bool
    ) -> list[int]:
        prefix = [self.cls_id] if add_cls else []
        suffix = [self.eos_id] if add_eos else []
        if max_length is not None:
            budget = max_length - len(prefix) - len(suffix)
            if budget < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the cls/eos tokens")
            body = body[:budget]
        return prefix + list(body) + suffix

    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy that encodes special-token strings found in text as ordinary text."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def __getstate__(self) -> dict[str, Any]:
        # tokenizers does not pickle the encode_special_tokens flag: rebuild the copy instead.
        return {**self.__dict__, "_plain": None}

    # ------------------------------------------------------------------------ decoding
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of ``ids``; byte-level BPE round-trips any UTF-8 exactly."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode expects 1-D ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def decode_batch(
        self, ids: torch.Tensor | Sequence[Sequence[int]], skip_special: bool = True
    ) -> list[str]:
        """:meth:`decode` for each row (padding is dropped with the other special tokens)."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return [self.decode(row, skip_special=skip_special) for row in rows]

    # ---------------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table's size)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def role_tokens(self) -> dict[str, str]:
        """Role name -> token string, e.g. ``{"pad": "<pad>", ...}``."""
        return dict(self._roles)

    def role_id(self, role: str) -> int:
        """Id of the token playing ``role`` (one of :data:`ROLES`)."""
        if role not in self._role_ids:
            raise KeyError(f"unknown role {role!r}; valid: {', '.join(ROLES)}")
        return self._role_ids[role]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every role token (what ``decode(skip_special=True)`` removes)."""
        return frozenset(self._role_ids.values())

    @property
    def pad_id(self) -> int:
        """Padding id (0 for a tokenizer trained here)."""
        return self._role_ids["pad"]

    @property
    def cls_id(self) -> int:
        """Sequence-start / summary token id."""
        return self._role_ids["cls"]

    @property
    def eos_id(self) -> int:
        """End-of-sequence / end-of-turn token id."""
        return self._role_ids["eos"]

    @property
    def mask_id(self) -> int:
        """Masked-LM mask token id."""
        return self._role_ids["mask"]

    @property
    def image_id(self) -> int:
        """Image placeholder token id."""
        return self._role_ids["image"]

    @property
    def system_id(self) -> int:
        """System-turn role token id."""
        return self._role_ids["system"]

    @property
    def user_id(self) -> int:
        """User-turn role token id."""
        return self._role_ids["user"]

    @property
    def char_id(self) -> int:
        """Character-turn role token id."""
        return self._role_ids["char"]

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """Token string of ``index``, or None when out of range."""
        return self._backend.id_to_token(index)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def _check_unicode(text: str) -> None:
    """Refuse lone surrogates with a clear error (the Rust tokenizer says only "must be str")."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}: "
                         f"only valid Unicode can be tokenized") from None


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    *,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (case kept, no normalization) with :data:`SPECIAL_TOKENS` first."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size must be >= {floor} (256 bytes + specials), got {vocab_size}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    ids = [backend.token_to_id(tok) for tok in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):  # pragma: no cover - guards a tokenizers change
        raise RuntimeError(f"special tokens got ids {ids}, expected 0..{len(SPECIAL_TOKENS) - 1}")
    return Tokenizer(backend)


def pad_ids(
    sequences: Sequence[Sequence[int] | torch.Tensor],
    pad_id: int,
    *,
    length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences: ``(ids (B, T) long, attention_mask (B, T) bool)``.

    T is the longest sequence, or ``length`` (sequences longer than it are an error).
    """
    lengths = [len(seq) for seq in sequences]
    width = max(lengths, default=0) if length is None else length
    if length is not None and lengths and max(lengths) > length:
        raise ValueError(f"a sequence has {max(lengths)} ids, longer than length={length}")
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)  # (B, T)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        ids[row, :n] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :n] = True
    return ids, mask


# ----------------------------------------------------------------------------- helpers
def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise DataError(
            "tokenizer.json not found (only 'fast' tokenizers are supported; convert a slow one "
            "with transformers: AutoTokenizer.from_pretrained(src).save_pretrained(dst))",
            path,
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception on malformed files
        raise DataError(f"cannot load tokenizer: {exc}", path) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"invalid JSON: {exc}", path) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object", path)
    return data


def _token_string(value: Any) -> str | None:
    """HF configs store a special token as a string or as ``{"content": "..."}``."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _saved_roles(config: Mapping[str, Any], path: Path) -> dict[str, str]:
    """The role map written by :meth:`Tokenizer.save`, validated; empty when there is none."""
    roles = config.get(_ROLES_KEY)
    if roles is None:
        return {}
    if not isinstance(roles, dict) or not all(isinstance(v, str) and v for v in roles.values()):
        raise DataError(f"{_ROLES_KEY!r} must map role names to token strings", path)
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise DataError(f"{_ROLES_KEY!r} has unknown role(s) {unknown}; valid: {list(ROLES)}", path)
    return dict(roles)


def _roles_from_hf(config: Mapping[str, Any], backend: tokenizers.Tokenizer) -> dict[str, str]:
    """Map the HF special tokens that exist in the vocabulary onto our roles."""
    roles: dict[str, str] = {}
    for role, keys in _HF_ROLE_KEYS.items():
        for key in keys:
            token = _token_string(config.get(key))
            if token is not None and backend.token_to_id(token) is not None:
                roles[role] = token
                break
    return roles


