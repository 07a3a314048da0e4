"""Austen text from the Debian package (R lazy-load reader) and passkey prompts."""

from __future__ import annotations

import struct

import pytest

from cab_vllm.text import RReader, answer_has_passkey, austen_books, passkey_prompt


# --- a tiny R XDR serializer for hand-made streams --------------------------------------------------
def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return _i(9) + _i(-1)
    b = s.encode("utf-8")
    return _i(9 | (1 << (12 + 3))) + _i(len(b)) + b  # UTF8_MASK


def _strsxp(items, attrs: bytes | None = None) -> bytes:
    flags = 16 | ((1 << 9) if attrs else 0)
    return _i(flags) + _i(len(items)) + b"".join(_charsxp(x) for x in items) + (attrs or b"")


def _names_attr(names) -> bytes:
    # pairlist (LISTSXP with tag) holding names = <STRSXP>, terminated by NILVALUE
    sym = _i(1) + _charsxp("names")
    return _i(2 | (1 << 10)) + sym + _strsxp(names) + _i(254)


def _vecsxp(items: list[bytes], names=None) -> bytes:
    flags = 19 | ((1 << 9) if names else 0)
    return _i(flags) + _i(len(items)) + b"".join(items) + (_names_attr(names) if names else b"")


def _header(version: int = 3) -> bytes:
    h = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500)
    return h + (_i(5) + b"UTF-8" if version == 3 else b"")


@pytest.mark.parametrize("version", [2, 3])
def test_r_reader_strings_lists_attributes(version):
    ints = _i(13) + _i(3) + _i(1) + _i(-(2**31)) + _i(7)
    reals = _i(14) + _i(2) + struct.pack(">2d", 0.5, -2.0)
    lgl = _i(10) + _i(2) + _i(1) + _i(0)
    inner = _vecsxp([_strsxp(["a"]), ints])
    data = _header(version) + _vecsxp([_strsxp(["Émile", None, "x"]), inner, reals, lgl, _i(254)],
                                      names=["s", "nested", "r", "l", "nul"])
    obj = RReader(data).read()
    assert obj.attrs["names"] == ["s", "nested", "r", "l", "nul"]
    assert list(obj[0]) == ["Émile", None, "x"]
    assert list(obj[1][0]) == ["a"] and list(obj[1][1]) == [1, None, 7]
    assert list(obj[2]) == [0.5, -2.0]
    assert list(obj[3]) == [True, False]
    assert obj[4] is None


def test_r_reader_rejects_other_formats():
    with pytest.raises(ValueError, match="XDR"):
        RReader(b"A\n" + _i(3))
    with pytest.raises(ValueError, match="SEXP type"):
        RReader(_header() + _i(77)).read()


@pytest.fixture(scope="session")
def books():
    return austen_books()


def test_austen_books(books):
    assert len(books) == 6
    total = sum(len(t) for t in books.values())
    assert 3_500_000 < total < 4_500_000
    assert "It is a truth universally acknowledged" in books["Pride & Prejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in books["Emma"]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from cab_vllm.models import prepare_model

    return AutoTokenizer.from_pretrained(prepare_model("smollm2-135m-instruct"))


@pytest.mark.parametrize("haystack", ["filler", "austen"])
@pytest.mark.parametrize("n", [512, 3000])
def test_passkey_prompt(tokenizer, books, haystack, n):
    spans = []
    for depth in (0.0, 0.5, 1.0):
        p = passkey_prompt(tokenizer, n, depth, haystack, seed=3)
        assert abs(len(p.input_ids) - n) <= 0.02 * n
        s, e = p.needle_token_span
        needle = tokenizer.decode(p.input_ids[s:e])
        assert f"The pass key is {p.passkey}" in needle and needle.strip().endswith(f"{p.passkey} is the pass key")
        assert e - s < 40
        assert p.text.rstrip().endswith("The pass key is") and p.messages[0]["content"] == p.text
        spans.append(s)
    assert spans[0] < spans[1] < spans[2]
    assert spans[2] > 0.9 * n - 60


def test_passkey_prompt_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 1000, 1.5)
    with pytest.raises(ValueError, match="haystack"):
        passkey_prompt(tokenizer, 1000, 0.5, haystack="lorem")
    with pytest.raises(ValueError, match="too small"):
        passkey_prompt(tokenizer, 100, 0.5)


def test_answer_has_passkey():
    assert answer_has_passkey("The pass key is 12345.", "12345")
    assert not answer_has_passkey("The pass key is 123456.", "12345")
    assert not answer_has_passkey("I do not know", "12345")
