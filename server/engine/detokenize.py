"""Incremental (streaming) detokenization.

The prefix-offset / read-offset method of TGI and vLLM: keep two indices into the token list;
`decode(tokens[prefix:read])` is text already emitted, `decode(tokens[prefix:])` is that plus the new
part. Decoding a short window (not the whole sequence) keeps each step O(window), and decoding BOTH
strings from the same `prefix` makes tokenizer-specific effects at the window's start (a SentencePiece
leading space being stripped, merges across the boundary) cancel out in the difference.

Broken characters: when a multi-byte UTF-8 character is split across tokens, decoding the partial
bytes yields U+FFFD. If the new text ends with U+FFFD, nothing is emitted and the offsets do not move;
the bytes stay in the window until the character is complete. `flush()` at the end of a request
emits whatever is left (a truly truncated character then shows as U+FFFD, as the full decode would).

Text offsets (OpenAI `text_offset` for logprobs): every token gets the character offset, within the
generated text, at which its text starts, i.e. the length of the text emitted before it; the tokens of
one held-back character all get that character's start.
"""
from __future__ import annotations

from dataclasses import dataclass, field

INITIAL_PREFIX_WINDOW = 5  # prompt tokens kept as decoding context for the first generated token
_REPLACEMENT = "\ufffd"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _decode(tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _id_to_token(tokenizer, token_id: int) -> str | None:
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return tokenizer.convert_ids_to_tokens(int(token_id))
    if hasattr(tokenizer, "id_to_token"):
        return tokenizer.id_to_token(int(token_id))
    return None


def token_bytes(tokenizer, token_id: int) -> list[int]:
    """The UTF-8 bytes of one token (OpenAI chat logprobs `bytes`), exact even for partial characters:
    byte-level BPE pieces are mapped back through the GPT-2 byte alphabet, SentencePiece byte-fallback
    pieces `<0xAB>` give their byte, anything else its decoded text."""
    piece = _id_to_token(tokenizer, token_id)
    if piece:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return [int(piece[3:5], 16)]
            except ValueError:
                pass
        if all(c in _UNICODE_TO_BYTE for c in piece):
            text = _decode(tokenizer, [int(token_id)], False)
            if _REPLACEMENT in text or text.encode("utf-8") != piece.encode("utf-8"):
                return [_UNICODE_TO_BYTE[c] for c in piece]
    return list(_decode(tokenizer, [int(token_id)], False).encode("utf-8"))


def token_text(tokenizer, token_id: int) -> str:
    """Text of one token for logprob listings (`tokens`, `top_logprobs` keys). A token that is only
    part of a UTF-8 character decodes to U+FFFD; its exact bytes are given by `token_bytes`."""
    return _decode(tokenizer, [int(token_id)], False)


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True

    def __post_init__(self):
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.prefix_offset = max(len(self.token_ids) - INITIAL_PREFIX_WINDOW, 0)
        self.read_offset = len(self.token_ids)
        self.output_text = ""
        self.text_offsets: list[int] = []  # per generated token

    def _window(self) -> tuple[str, str]:
        prefix = _decode(self.tokenizer, self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = _decode(self.tokenizer, self.token_ids[self.prefix_offset:], self.skip_special_tokens)
        return prefix, full

    def step(self, token_id: int) -> str:
        """Add one generated token; returns the newly complete text (possibly "")."""
        self.text_offsets.append(len(self.output_text))
        self.token_ids.append(int(token_id))
        prefix, full = self._window()
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.token_ids)
            self.output_text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the request: emit anything still held back (an unfinished character)."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix, full = self._window()
        delta = full[len(prefix):] if full.startswith(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.output_text += delta
        return delta
