"""Austen text from the Debian package (R serialization reader, lazy-load DB) and passkey prompts.

The reader tests run on hand-made streams and need no network; the Austen tests fetch the .deb once through the
explicit step (fetch_austen, `python -m cab_models.text fetch`; then the JSON cache under $CAB_CACHE_DIR answers); the passkey tests need the SmolLM2 tokenizer (prepare_model)."""

from __future__ import annotations

import gzip
import lzma
import math
import struct
import time
import zlib

import pytest

from cab_models.text import (AustenNotFetched, RReader, _insert_needle, answer_has_passkey, austen_books,
                             fetch_austen, needle_sentence, passkey_prompt, read_lazyload, unserialize)


# --- a tiny R XDR serializer for hand-made streams -------------------------------------------------------------
def _i(*v: int) -> bytes:
    return struct.pack(f">{len(v)}i", *v)


NILVALUE = _i(254)
ATTR, TAG = 1 << 9, 1 << 10


def _char(s: str | None, enc: str = "utf8") -> bytes:
    if s is None:
        return _i(9, -1)
    level = {"utf8": 1 << 3, "latin1": 1 << 2, "native": 0}[enc]
    b = s.encode("latin-1" if enc == "latin1" else "utf-8")
    return _i(9 | (level << 12), len(b)) + b


def _sym(name: str) -> bytes:
    return _i(1) + _char(name, "native")


def _attrs(**attrs: bytes) -> bytes:
    """A tagged pairlist of attributes; keyword names with '_' stand for '.' (row_names -> row.names)."""
    out = b""
    for key, value in attrs.items():
        out += _i(2 | TAG) + _sym(key.replace("_", ".")) + value
    return out + NILVALUE


def _str(items, attrs: bytes = b"", enc: str = "utf8") -> bytes:
    return _i(16 | (ATTR if attrs else 0), len(items)) + b"".join(_char(x, enc) for x in items) + attrs


def _int(values, attrs: bytes = b"") -> bytes:
    return _i(13 | (ATTR if attrs else 0), len(values)) + _i(*values) + attrs


def _lgl(values) -> bytes:
    return _i(10, len(values)) + _i(*values)


def _real(values) -> bytes:
    return _i(14, len(values)) + struct.pack(f">{len(values)}d", *values)


def _vec(items: list[bytes], attrs: bytes = b"") -> bytes:
    return _i(19 | (ATTR if attrs else 0), len(items)) + b"".join(items) + attrs


def _header(version: int = 3) -> bytes:
    h = b"X\n" + _i(version, 0x040201, 0x030500)
    return h + (_i(5) + b"UTF-8" if version == 3 else b"")


NA_INT = -(2**31)


# --- the reader --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [2, 3])
def test_reader_vectors_lists_attributes(version):
    inner = _vec([_str(["a"]), _int([1, NA_INT, 7]), NILVALUE])
    data = _header(version) + _vec(
        [_str(["Émile", None, "x", "naïve"]), inner, _real([0.5, -2.0, math.inf]), _lgl([1, 0, NA_INT]), NILVALUE],
        _attrs(names=_str(["s", "nested", "r", "l", "nul"])))
    obj = unserialize(data)
    assert obj.names == ["s", "nested", "r", "l", "nul"]
    assert obj[0] == ["Émile", None, "x", "naïve"]
    assert obj[1][0] == ["a"] and obj[1][1] == [1, None, 7] and obj[1][2] is None
    assert obj[2] == [0.5, -2.0, math.inf]
    assert obj[3] == [True, False, None]
    assert obj[4] is None


def test_reader_string_encodings():
    data = _header(2) + _str(["café"], enc="latin1")
    assert unserialize(data) == ["café"]
    data = _header(3) + _str(["日本語 ok", "plain"], enc="native")  # unflagged: the header's native encoding
    assert unserialize(data) == ["日本語 ok", "plain"]


def test_reader_data_frame_and_symbol_references():
    # data.frame(x = 1:3, y = c("a", NA, "c")): names, class and compact row.names c(NA, -3); the second use of a
    # symbol is written as a reference (REFSXP with the packed index), as R does.
    cols = [_int([1, 2, 3]), _str(["a", None, "c"])]
    attrs = (_i(2 | TAG) + _sym("names") + _str(["x", "y"])
             + _i(2 | TAG) + _sym("class") + _str(["data.frame"])
             + _i(2 | TAG) + _sym("row.names") + _int([NA_INT, -3])
             + NILVALUE)
    first = unserialize(_header() + _vec(cols, attrs))
    assert first.names == ["x", "y"] and first.attrs["class"] == ["data.frame"]
    assert first.attrs["row.names"] == [None, -3]
    assert first[0] == [1, 2, 3] and first[1] == ["a", None, "c"]
    # list(a = 1L, b = list(a = 2L)): items come before attributes, so the inner list writes the symbol `names`
    # first and the outer list refers back to it (REFSXP, packed index 1)
    nested = _vec([_int([2])], _attrs(names=_str(["a"])))
    ref_names = _i((1 << 8) | 255)
    outer = _i(19 | ATTR, 2) + _int([1]) + nested + _i(2 | TAG) + ref_names + _str(["a", "b"]) + NILVALUE
    obj = unserialize(_header() + outer)
    assert obj.names == ["a", "b"] and obj[1].names == ["a"] and obj[0] == [1] and obj[1][0] == [2]


def test_reader_pairlist_and_altrep():
    pl = _i(2 | TAG) + _sym("k1") + _int([5]) + _i(2 | TAG) + _sym("k2") + _str(["v"]) + NILVALUE
    obj = unserialize(_header() + pl)
    assert obj.names == ["k1", "k2"] and obj[0] == [5] and obj[1] == ["v"]
    # 1:4 written by R >= 3.5 as ALTREP compact_intseq: info pairlist (class, package, type), state c(n, n1, inc)
    info = _i(2) + _sym("compact_intseq") + _i(2) + _sym("base") + _i(2) + _int([13]) + NILVALUE
    alt = _i(238) + info + _real([4.0, 1.0, 1.0]) + NILVALUE
    assert unserialize(_header() + alt) == [1, 2, 3, 4]


def test_reader_rejects_other_formats():
    with pytest.raises(ValueError, match="XDR"):
        RReader(b"A\n" + _i(3))
    with pytest.raises(ValueError, match="version"):
        RReader(b"X\n" + _i(4, 0, 0))
    with pytest.raises(ValueError, match="SEXP type"):
        unserialize(_header() + _i(77))


@pytest.mark.parametrize("compressed", [1, 3], ids=["zlib", "xz-typed"])
def test_read_lazyload_roundtrip(tmp_path, compressed):
    objs = {"first": _header() + _str(["line one", "line two"]), "second": _header() + _int([1, 2])}
    blob, offsets = b"", []
    for payload in objs.values():
        body = zlib.compress(payload) if compressed == 1 else b"Z" + lzma.compress(payload)
        record = struct.pack(">I", len(payload)) + body
        offsets.append((len(blob), len(record)))
        blob += record
    variables = _vec([_int(list(o)) for o in offsets], _attrs(names=_str(list(objs))))
    flag = _lgl([1]) if compressed == 1 else _real([float(compressed)])  # R stores TRUE, 2 or 3
    index = _vec([variables, _vec([]), flag], _attrs(names=_str(["variables", "references", "compressed"])))
    (tmp_path / "x.rdx").write_bytes(gzip.compress(_header() + index))
    (tmp_path / "x.rdb").write_bytes(blob)
    got = read_lazyload(tmp_path / "x.rdx", tmp_path / "x.rdb")
    assert got == {"first": ["line one", "line two"], "second": [1, 2]}


# --- needle placement (offline) ---------------------------------------------------------------------------------
def test_insert_needle_at_sentence_boundaries():
    hay = "One two. Three four! Five six? Seven\neight. Nine"
    assert _insert_needle(hay, 0.0, "N.") == "N. " + hay
    assert _insert_needle(hay, 1.0, "N.") == hay + " N."
    mid = _insert_needle(hay, 0.5, "N.")
    assert mid == "One two. Three four! N. Five six? Seven\neight. Nine"
    assert _insert_needle(hay, 0.8, "N.") == "One two. Three four! Five six? Seven\neight. N. Nine"
    assert _insert_needle("", 0.5, "N.") == "N."


# --- Austen (the explicit fetch step downloads the Debian package on the first run) -------------------------------
@pytest.fixture(scope="session")
def books():
    fetch_austen()
    return austen_books()


def test_austen_books_never_downloads(tmp_path, monkeypatch):
    """A library call on an empty cache runs nothing (no apt-get) and names the command that fetches the text."""
    import subprocess

    def refuse(*a, **k):
        raise AssertionError(f"austen_books ran a command: {a}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    with pytest.raises(AustenNotFetched, match=r"python -m cab_models\.text fetch --cache-dir .*apt-get download "
                                                r"r-cran-janeaustenr"):
        austen_books(tmp_path)
    assert not (tmp_path / "text").exists()


def test_fetch_cli_reads_the_cache(books, capsys):
    from cab_models.text import main

    main(["fetch"])  # cached: prints the path, downloads nothing
    assert capsys.readouterr().out.strip().endswith("austen.json")


def test_austen_books(books):
    assert list(books) == ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
                           "Northanger Abbey", "Persuasion"]
    total = sum(len(t) for t in books.values())
    assert 3_500_000 <= total <= 4_500_000
    assert "It is a truth universally acknowledged" in books["Pride & Prejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in books["Emma"]
    assert "Sir Walter Elliot, of Kellynch Hall" in books["Persuasion"]
    t0 = time.perf_counter()
    assert austen_books() == books  # from the JSON cache
    assert time.perf_counter() - t0 < 1.0


# --- passkey prompts ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from cab_models.models import prepare_model

    return AutoTokenizer.from_pretrained(prepare_model("smollm2-135m-instruct"))


@pytest.mark.parametrize("haystack", ["filler", "austen"])
@pytest.mark.parametrize("n", [512, 3000])
def test_passkey_prompt(tokenizer, books, haystack, n):
    starts, keys = [], set()
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        p = passkey_prompt(tokenizer, n, depth, haystack, seed=3)
        assert abs(len(p.input_ids) - n) <= 0.02 * n
        ref = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert p.input_ids == list(ref["input_ids"])
        assert p.passkey.isdigit() and len(p.passkey) in (5, 6)
        s, e = p.needle_token_span
        assert tokenizer.decode(p.input_ids[s:e]).strip() == needle_sentence(p.passkey)
        assert p.text.startswith("There is a pass key hidden") and p.text.endswith("What is the pass key?")
        assert p.messages == [{"role": "user", "content": p.text}]
        starts.append(s)
        keys.add(p.passkey)
    assert starts == sorted(starts) and starts[0] < 60 and starts[-1] > n - 80
    assert len(keys) == 1  # the key depends on the seed only
    assert passkey_prompt(tokenizer, n, 0.5, haystack, seed=4).passkey != keys.pop()


def test_passkey_prompt_seeds_move_the_austen_haystack(tokenizer, books):
    a, b = (passkey_prompt(tokenizer, 600, 0.5, "austen", seed=s) for s in (0, 1))
    assert a.text.split("\n\n")[1][:200] != b.text.split("\n\n")[1][:200]
    assert passkey_prompt(tokenizer, 600, 0.5, "austen", seed=0) == a


def test_passkey_prompt_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 1000, 1.5)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 1000, -0.1)
    with pytest.raises(ValueError, match="haystack"):
        passkey_prompt(tokenizer, 1000, 0.5, haystack="lorem")
    with pytest.raises(ValueError, match="too small"):
        passkey_prompt(tokenizer, 60, 0.5, haystack="filler")


def test_answer_has_passkey():
    assert answer_has_passkey("The pass key is 12345.", "12345")
    assert answer_has_passkey("12345", "12345")
    assert not answer_has_passkey("The pass key is 123456.", "12345")
    assert not answer_has_passkey("I do not know", "12345")
