"""The byte level of character card files: strict card JSON and the text chunks of a PNG card.

PNG chunks are walked up to ``IEND`` with every length and CRC checked; ``zTXt``/``iTXt`` text is
never inflated past the JSON limit; the JSON (base64 in the chunk, or bare) goes through the
strict loader of ``data/jsonl.py``. Everything raises :class:`~personae.errors.CardError`.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from collections.abc import Iterator
from os import PathLike
from typing import Any

from personae.data.jsonl import JsonError, strict_json_loads
from personae.errors import CardError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_CHUNKS = ("ccv3", "chara")  # in order of preference
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
Where = str | PathLike[str] | None  # what an error message names


def parse_card_json(raw: bytes, where: Where, what: str) -> Any:
    """Decode UTF-8 JSON (a BOM is allowed) strictly (see ``data/jsonl.py``), with CardErrors."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CardError(f"{what} is not UTF-8 text: {exc}", where) from None
    try:
        return strict_json_loads(text)
    except JsonError as exc:
        raise CardError(f"{what} is not valid JSON: {exc}", where) from None


def png_chunks(raw: bytes, where: str) -> Iterator[tuple[bytes, bytes, bytes]]:
    """Yield (type, body, whole chunk) for each chunk up to IEND, checking lengths and CRCs."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(raw):
        length, chunk_type = struct.unpack(">I4s", raw[pos : pos + 8])
        end = pos + 12 + length
        if end > len(raw):
            kind = chunk_type.decode("latin-1")
            raise CardError(f"PNG is truncated: chunk {kind!r} at byte {pos} is cut short", where)
        body = raw[pos + 8 : end - 4]
        if zlib.crc32(chunk_type + body) != struct.unpack(">I", raw[end - 4 : end])[0]:
            kind = chunk_type.decode("latin-1")
            raise CardError(f"PNG chunk {kind!r} at byte {pos} has a bad CRC (damaged file)", where)
        yield chunk_type, body, raw[pos:end]
        if chunk_type == b"IEND":
            return
        pos = end
    raise CardError("PNG is truncated: no IEND chunk", where)


def card_text(chunk_type: bytes, body: bytes, where: str, limit: int) -> tuple[str, bytes] | None:
    """(keyword, payload) of a tEXt/zTXt/iTXt chunk named chara/ccv3 (any case), else None."""
    if chunk_type not in TEXT_CHUNKS:
        return None
    keyword_bytes, sep, rest = body.partition(b"\0")
    keyword = keyword_bytes.decode("latin-1").lower()
    if not sep or keyword not in CARD_CHUNKS:
        return None
    payload_limit = limit * 4 // 3 + 4  # base64 of the largest JSON we accept
    if chunk_type == b"tEXt":
        return keyword, rest
    if chunk_type == b"zTXt":  # compression method byte, then zlib data
        return keyword, _inflate(rest[1:], keyword, where, payload_limit)
    parts = rest[2:].split(b"\0", 2)  # iTXt: flag, method, language\0, translated keyword\0, text
    if len(parts) < 3:
        raise CardError(f"PNG iTXt chunk '{keyword}' is malformed", where)
    compressed = rest[:1] == b"\x01"
    return keyword, _inflate(parts[2], keyword, where, payload_limit) if compressed else parts[2]


def _inflate(data: bytes, keyword: str, where: str, limit: int) -> bytes:
    """zlib-decompress a text chunk, refusing to expand past ``limit`` bytes."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise CardError(f"PNG chunk '{keyword}' is not valid compressed data: {exc}", where) from None
    if len(out) > limit:
        raise CardError(f"PNG chunk '{keyword}' expands past the limit of {limit} bytes", where)
    if not inflater.eof:
        raise CardError(f"PNG chunk '{keyword}' has truncated compressed data", where)
    return out


def decode_payload(keyword: str, payload: bytes, where: str, limit: int) -> Any:
    """The JSON object in a chara/ccv3 payload: base64 of UTF-8 JSON (bare JSON also accepted)."""
    text = payload.strip()
    if not text:
        raise CardError(f"PNG chunk '{keyword}' is empty", where)
    if len(text) > limit * 4 // 3 + 4:
        raise CardError(f"PNG chunk '{keyword}' is over the limit of {limit} bytes of JSON", where)
    if text.startswith(b"{"):  # some old writers stored the JSON itself
        return parse_card_json(text, where, f"PNG chunk '{keyword}'")
    compact = re.sub(rb"\s+", b"", text)
    try:
        raw = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except binascii.Error as exc:
        raise CardError(f"PNG chunk '{keyword}' is not valid base64: {exc}", where) from None
    if len(raw) > limit:
        raise CardError(f"PNG chunk '{keyword}' holds {len(raw)} bytes of JSON, over {limit}", where)
    return parse_card_json(raw, where, f"PNG chunk '{keyword}'")
