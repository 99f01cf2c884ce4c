"""Incremental detokenization: no U+FFFD for multi-byte characters split across tokens, deltas add up to
the full decode, text offsets, exact token bytes."""
from __future__ import annotations

import pytest

from server.engine.detokenize import IncrementalDetokenizer, token_bytes, token_text
from server.engine.testing import byte_tokenizer

TEXT = "héllo wörld € 😀 the fox 日本語 ok 👩‍👩‍👧 done"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_multibyte_characters_are_split_across_tokens(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    pieces = [tok.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) > 20  # the premise: many tokens are partial characters


@pytest.mark.parametrize("prompt_chars", [0, 1, 6, 14])
def test_stream_never_emits_replacement_char_and_adds_up(tok, prompt_chars):
    prompt, completion = TEXT[:prompt_chars], TEXT[prompt_chars:]
    p_ids = tok.encode(prompt) if prompt else []
    ids = tok.encode(completion)
    d = IncrementalDetokenizer(tok, p_ids)
    deltas = [d.step(t) for t in ids]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) + d.flush() == completion
    assert d.output_text == completion
    # text offsets: non-decreasing, within the text, and each emitted delta starts at its token's offset
    offs = d.text_offsets
    assert len(offs) == len(ids) and offs == sorted(offs) and offs[-1] < len(completion)
    pos = 0
    for off, delta in zip(offs, deltas):
        assert off <= pos
        if delta:
            assert completion[pos:pos + len(delta)] == delta
            pos += len(delta)
    # the four byte tokens of the emoji share the emoji's offset
    k = completion.find("😀")
    if k >= 0:
        assert offs.count(k) >= 4


def test_flush_emits_truncated_character_only_at_the_end(tok):
    ids = tok.encode("ab€")
    d = IncrementalDetokenizer(tok, [])
    out = [d.step(t) for t in ids[:-1]]  # the last byte of € is missing
    assert "".join(out) == "ab" and "\ufffd" not in "".join(out)
    assert d.flush() == "\ufffd"


def test_token_bytes_are_exact_for_partial_characters(tok):
    ids = tok.encode("😀 ok é")
    assert b"".join(bytes(token_bytes(tok, i)) for i in ids) == "😀 ok é".encode()
    assert token_text(tok, ids[0]) == "\ufffd" and token_bytes(tok, ids[0]) == [0xF0]
    ascii_ids = tok.encode(" the quick fox")
    assert len(ascii_ids) < len(" the quick fox")  # merged tokens
    assert "".join(token_text(tok, i) for i in ascii_ids) == " the quick fox"


def test_special_tokens_are_skipped_by_default(tok):
    eos = tok.eos_token_id
    d = IncrementalDetokenizer(tok, tok.encode("hi"))
    assert d.step(tok.encode(" the")[0]) == " the"
    assert d.step(eos) == ""
    d2 = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert d2.step(eos) == "<eos>"
