"""Per-token text and raw bytes for logprobs.

Decoding one token of a byte-level BPE vocabulary can give half a UTF-8 character ("\\ufffd"), so the
``bytes`` field OpenAI's chat logprobs carry is read from the vocabulary itself: byte-level symbols map
back to bytes, SentencePiece byte tokens (``<0xNN>``) are bytes already. Results are cached per id.
"""
from __future__ import annotations

import re
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class TokenText:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        dec = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(dec).__name__ == "ByteLevel"
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, tok: int) -> str:
        t = self._text.get(tok)
        if t is None:
            t = self.tokenizer.decode([tok]) if self.tokenizer is not None else f"<{tok}>"
            if len(self._text) < 1 << 20:
                self._text[tok] = t
        return t

    def bytes(self, tok: int) -> list[int]:
        b = self._bytes.get(tok)
        if b is None:
            b = self._raw(tok)
            if len(self._bytes) < 1 << 20:
                self._bytes[tok] = b
        return b

    def _raw(self, tok: int) -> list[int]:
        if self.tokenizer is not None:
            piece = self.tokenizer.convert_ids_to_tokens(tok)
            if isinstance(piece, str):
                m = _BYTE_TOKEN.match(piece)
                if m:
                    return [int(m.group(1), 16)]
                table = _byte_level_decoder()
                if self.byte_level and piece and all(c in table for c in piece):
                    return [table[c] for c in piece]
        return list(self.text(tok).encode("utf-8"))
