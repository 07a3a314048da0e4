"""Natural text offline: Jane Austen's six novels from Debian's r-cran-janeaustenr, and passkey prompts.

The Debian package ships the books as an R lazy-load database (data/Rdata.rdx + Rdata.rdb). The .rdx is a gzip'd
R serialization of ``list(variables = list(<name> = c(offset, length), ...), references, compressed)``; each
object in the .rdb is a 4-byte big-endian uncompressed length followed by a zlib stream (or, for
``compressed`` 2/3, a type byte and a bzip2/xz/zlib stream) of its own R serialization. ``RReader`` reads R's XDR
serialization format (versions 2 and 3) for the types such data holds. (The PyPI package ``rdata`` parses the
same streams but pulls in pandas and xarray; this reader gives identical text.)
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import re
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from cab_models.models import cache_root, file_lock

BOOKS = {  # R variable in janeaustenr -> title (janeaustenr's own titles, in publication order)
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


# ----------------------------------------------------------------------------------------------------------------
# R serialization reader
# ----------------------------------------------------------------------------------------------------------------
class RObject(list):
    """An R vector, list or pairlist as a Python list, with its attributes (names, class, ...) in ``attrs``.

    Elements: str or None (NA) for character vectors; int or None for integer; bool or None for logical; float
    (NA and NaN both as float nan) for double; complex; RObject / None (NULL) for list elements."""

    def __init__(self, items=(), attrs: dict | None = None):
        super().__init__(items)
        self.attrs = attrs if attrs is not None else {}

    @property
    def names(self) -> list | None:
        return self.attrs.get("names")


class RReader:
    """Reader of one R serialization stream in XDR format ("X\\n", versions 2 and 3), already decompressed.

    Supports NULL, symbols, pairlists (and language objects read as pairlists), character / logical / integer /
    double / complex / raw vectors, lists, attributes (so data frames and factors), environments (contents
    dropped), references, and the ALTREP compact sequences and wrappers R >= 3.5 writes. Anything else (closures'
    byte code, external pointers, ...) raises ValueError.
    """

    NIL, SYM, LIST, CLO, ENV, PROM, LANG, CHAR = 0, 1, 2, 3, 4, 5, 6, 9
    LGL, INT, REAL, CPLX, STR, DOT, VEC, EXPR, RAW, OBJ = 10, 13, 14, 15, 16, 17, 19, 20, 24, 25
    REF, NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, BASENS = 255, 254, 253, 252, 251, 250
    NAMESPACE, PACKAGE, PERSIST, EMPTYENV, BASEENV, ALTREP = 249, 248, 247, 242, 241, 238
    SPECIAL_ENVS = (GLOBALENV, UNBOUND, MISSINGARG, BASENS, EMPTYENV, BASEENV)
    PAIRLISTS = (LIST, LANG, CLO, PROM, DOT)
    NA_INT = -(2**31)
    # CHARSXP "levels" bits (flags >> 12)
    BYTES, LATIN1, UTF8 = 1 << 1, 1 << 2, 1 << 3

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization stream (header {data[:2]!r}); "
                             "decompress it first, and only the binary XDR format is supported")
        self.data, self.pos, self.refs = data, 2, []
        self.version = self.int()
        self.int(), self.int()  # writer's R version, minimal reader version
        self.encoding = "utf-8"
        if self.version == 3:
            n = self.int()
            self.encoding = self.data[self.pos : self.pos + n].decode("ascii").lower()
            self.pos += n
        elif self.version != 2:
            raise ValueError(f"unsupported R serialization version {self.version}")

    # --- primitives -----------------------------------------------------------------------------------------
    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def _unpack(self, fmt: str, n: int, size: int) -> tuple:
        v = struct.unpack_from(f">{n}{fmt}", self.data, self.pos)
        self.pos += size * n
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: upper and lower 32 bits follow
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def _string(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        levels = flags >> 12
        if levels & self.UTF8:
            return raw.decode("utf-8")
        if levels & (self.LATIN1 | self.BYTES):
            return raw.decode("latin-1")
        try:  # unflagged: ASCII or the writer's native encoding
            return raw.decode(self.encoding)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")

    # --- items ----------------------------------------------------------------------------------------------
    def read(self):
        """The next item: None for NULL, str for a symbol, RObject for vectors / lists / pairlists."""
        flags = self.int()
        typ, has_attr = flags & 0xFF, bool(flags & (1 << 9))
        if typ in (self.NILVALUE, self.NIL) or typ in self.SPECIAL_ENVS:
            return None
        if typ == self.REF:
            idx = flags >> 8
            return self.refs[(idx if idx else self.int()) - 1]
        if typ == self.SYM:
            name = self.read()  # a CHARSXP
            self.refs.append(name)
            return name
        if typ in (self.NAMESPACE, self.PACKAGE):
            if self.int() != 0:
                raise ValueError("names in a namespace/package reference are not a plain string vector")
            obj = RObject(self.read() for _ in range(self.int()))
            self.refs.append(obj)
            return obj
        if typ == self.CHAR:
            return self._string(flags)
        if typ in self.PAIRLISTS:
            return self._pairlist(flags)
        if typ == self.ENV:
            self.int()  # locked
            env = RObject()
            self.refs.append(env)  # before the contents: they may refer back to it
            self.read(), self.read(), self.read()  # enclosure, frame, hash table
            self._set_attrs(env, self.read())
            return env
        if typ == self.ALTREP:
            return self._altrep()
        if typ in (self.STR, self.VEC, self.EXPR):
            out = RObject(self.read() for _ in range(self.length()))
        elif typ == self.INT:
            out = RObject(None if v == self.NA_INT else v for v in self._unpack("i", self.length(), 4))
        elif typ == self.LGL:
            out = RObject(None if v == self.NA_INT else bool(v) for v in self._unpack("i", self.length(), 4))
        elif typ == self.REAL:
            out = RObject(self._unpack("d", self.length(), 8))
        elif typ == self.CPLX:
            v = self._unpack("d", 2 * self.length(), 8)
            out = RObject(complex(re_, im) for re_, im in zip(v[::2], v[1::2], strict=True))
        elif typ == self.RAW:
            n = self.length()
            out = RObject(self.data[self.pos : self.pos + n])
            self.pos += n
        elif typ == self.OBJ:
            out = RObject()
        else:
            raise ValueError(f"unsupported R SEXP type {typ} at byte {self.pos - 4}")
        if has_attr:
            self._set_attrs(out, self.read())
        return out

    def _pairlist(self, flags: int) -> RObject:
        """A pairlist read iteratively (long pairlists would overflow recursion): [attr] [tag] car, cdr..."""
        items, tags, attrs = [], [], None
        while True:
            if flags & (1 << 9):
                attrs = self.read()
            tags.append(self.read() if flags & (1 << 10) else None)
            items.append(self.read())
            flags = self.int()
            if flags & 0xFF not in self.PAIRLISTS:
                self.pos -= 4
                self.read()  # the terminating cdr (NILVALUE for a proper list)
                break
        out = RObject(items, {"names": tags} if any(t is not None for t in tags) else {})
        self._set_attrs(out, attrs)
        return out

    def _altrep(self):
        info, state, attrs = self.read(), self.read(), self.read()
        cls = info[0] if isinstance(info, RObject) and info else None
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            seq = [start + i * step for i in range(int(n))]
            out = RObject(int(v) for v in seq) if cls == "compact_intseq" else RObject(float(v) for v in seq)
        elif isinstance(cls, str) and cls.startswith("wrap_"):
            out = RObject(state[0])  # (wrapped vector, metadata)
        elif cls == "deferred_string" and state and all(isinstance(v, int) or v is None for v in state[0]):
            out = RObject(None if v is None else str(v) for v in state[0])  # as.character of an integer vector
        else:
            raise ValueError(f"unsupported ALTREP class {cls!r}")
        self._set_attrs(out, attrs)
        return out

    @staticmethod
    def _set_attrs(obj: RObject, pairlist) -> None:
        if isinstance(pairlist, RObject):
            obj.attrs.update(zip(pairlist.attrs.get("names") or [], pairlist, strict=False))  # untagged: dropped


def unserialize(data: bytes):
    """Parse one decompressed R XDR serialization stream (bytes starting with b"X\\n") into Python objects."""
    return RReader(data).read()


def _decompress_file(raw: bytes) -> bytes:
    """The serialization inside an .rds-style file: gzip, bzip2, xz or uncompressed, told by its magic bytes."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def _lazyload_object(chunk: bytes, compressed: int) -> bytes:
    """Decompress one .rdb record; ``compressed`` is the index's flag (0 none, 1 zlib, 2 bzip2, 3 xz)."""
    if not compressed:
        return chunk
    (n,) = struct.unpack_from(">I", chunk)
    if compressed in (2, 3):  # R_compress2/3: a type byte follows the length
        kind, body = chunk[4:5], chunk[5:]
        decoders = {b"Z": lzma.decompress, b"2": bz2.decompress, b"1": zlib.decompress, b"0": bytes}
        if kind not in decoders:
            raise ValueError(f"unknown lazy-load compression type {kind!r}")
        data = decoders[kind](body)
    else:
        data = zlib.decompress(chunk[4:])
    if len(data) != n:
        raise ValueError(f"lazy-load record decompressed to {len(data)} bytes, header says {n}")
    return data


def read_lazyload(rdx: Path, rdb: Path) -> dict:
    """{variable: R object} of an R lazy-load database (the .rdx index and .rdb objects, as R's lazyLoad)."""
    index = unserialize(_decompress_file(Path(rdx).read_bytes()))
    if not isinstance(index, RObject) or not index.names or "variables" not in index.names:
        raise ValueError(f"{rdx} is not an R lazy-load index (a named list with 'variables')")
    fields = dict(zip(index.names, index, strict=True))
    variables, compressed = fields["variables"], fields.get("compressed")
    compressed = int(compressed[0]) if compressed else 0
    blob = Path(rdb).read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.names, variables, strict=True):
        chunk = blob[int(offset) : int(offset) + int(length)]
        out[name] = unserialize(_lazyload_object(chunk, compressed))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Austen
# ----------------------------------------------------------------------------------------------------------------
DEBIAN_PACKAGE = "r-cran-janeaustenr"
FETCH_COMMAND = "python -m cab_models.text fetch"


class AustenNotFetched(FileNotFoundError):
    """The Austen text is not in the cache yet: ``python -m cab_models.text fetch`` puts it there."""


def _austen_cache(cache_dir: str | Path | None) -> Path:
    return cache_root(cache_dir) / "text" / "austen.json"


def books_from_deb(deb: str | Path, workdir: str | Path) -> dict[str, str]:
    """{title: text} from a downloaded ``r-cran-janeaustenr_*.deb`` (unpacked with dpkg-deb into ``workdir``)."""
    deb, tree = Path(deb), Path(workdir) / "x"
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {deb.name} failed: {proc.stderr[-1000:]}")
    rdx = [p for p in tree.rglob("Rdata.rdx") if p.parent.parent.name == "janeaustenr"]
    if not rdx:
        raise RuntimeError(f"{deb.name} holds no janeaustenr/data/Rdata.rdx")
    objs = read_lazyload(rdx[0], rdx[0].with_suffix(".rdb"))
    books = {}
    for var, title in BOOKS.items():
        if var not in objs:
            raise RuntimeError(f"janeaustenr data lacks {var!r}; it has {sorted(objs)}")
        books[title] = "\n".join("" if line is None else line for line in objs[var])
    return books


def fetch_austen(cache_dir: str | Path | None = None, deb: str | Path | None = None) -> Path:
    """The explicit download step (``python -m cab_models.text fetch``): ``apt-get download r-cran-janeaustenr``
    (Debian/Ubuntu, network; no root, nothing installed), or a .deb already downloaded (``deb``), read into
    ``<cache>/text/austen.json``. Returns that path; does nothing when it exists."""
    root = cache_root(cache_dir)
    cached = _austen_cache(cache_dir)
    if cached.exists():
        return cached
    with file_lock(root / "locks" / "austen.lock"):
        if cached.exists():
            return cached
        with tempfile.TemporaryDirectory(dir=root, prefix=".austen-") as tmp:
            if deb is None:
                cmd = ["apt-get", "download", DEBIAN_PACKAGE]
                try:
                    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
                except FileNotFoundError:
                    raise RuntimeError(f"{' '.join(cmd)}: no apt-get on this machine; download the .deb elsewhere "
                                       f"and pass it: {FETCH_COMMAND} --deb PATH") from None
                debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
                if proc.returncode != 0 or not debs:
                    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}; a fresh machine may need "
                                       f"`apt-get update` first): {proc.stderr[-1000:]}")
                deb = debs[-1]
            books = books_from_deb(deb, tmp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        part = cached.with_suffix(".json.part")
        part.write_text(json.dumps(books, ensure_ascii=False), encoding="utf-8")
        part.replace(cached)
    return cached


def austen_books(cache_dir: str | Path | None = None) -> dict[str, str]:
    """{title: full text, lines joined by "\\n"} of Austen's six novels (about 4.0 M characters in all), read from
    ``<cache>/text/austen.json``. Downloads nothing: AustenNotFetched says to run ``python -m cab_models.text
    fetch`` first (fetch_austen)."""
    cached = _austen_cache(cache_dir)
    if not cached.exists():
        opt = f" --cache-dir {cache_dir}" if cache_dir is not None else ""
        raise AustenNotFetched(f"Austen text not fetched ({cached} missing). Fetch it once with `{FETCH_COMMAND}{opt}` "
                               f"(runs `apt-get download {DEBIAN_PACKAGE}`: Debian/Ubuntu, network, no root), or "
                               f"`{FETCH_COMMAND}{opt} --deb PATH` with a {DEBIAN_PACKAGE}_*.deb fetched elsewhere")
    return json.loads(cached.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# passkey prompts
# ----------------------------------------------------------------------------------------------------------------
INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it."
QUESTION = "What is the pass key?"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("austen", "filler")
_SENTENCE_END = re.compile(r"[.!?][\"'’”)\]_]*\s+")  # the needle goes right after one of these (or at either end)


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey-retrieval chat prompt.

    text: the user message; passkey: 5 or 6 digits; messages: [{"role": "user", "content": text}];
    input_ids: list[int], the chat template applied with add_generation_prompt=True;
    needle_token_span: (start, end), the half-open range of input_ids that covers the needle sentence."""

    text: str
    passkey: str
    messages: list[dict[str, str]]
    input_ids: list[int]
    needle_token_span: tuple[int, int]


def needle_sentence(passkey: str) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


def _insert_needle(hay: str, depth: float, needle: str) -> str:
    """``hay`` (stripped) with ``needle`` inserted at the sentence boundary nearest to relative position ``depth``."""
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(hay)), len(hay)]
    cut = min(cuts, key=lambda c: abs(c - depth * len(hay)))
    if cut == 0:
        return f"{needle} {hay}" if hay else needle
    if cut == len(hay):
        return f"{hay} {needle}"
    return hay[:cut] + needle + hay[cut - 1] + hay[cut:]  # hay[cut - 1] is the whitespace ending the sentence


def _haystack_source(haystack: str, n_chars: int, position: float, cache_dir, corpus: str | None = None) -> str:
    """At least ``n_chars`` characters of haystack text; Austen starts at the first paragraph after relative
    ``position`` (0..1) of the six books joined (or of ``corpus`` if given), wrapping around at the end."""
    if haystack == "filler":
        return " ".join([FILLER] * (n_chars // len(FILLER) + 1))
    if corpus is None:
        corpus = "\n\n".join(austen_books(cache_dir).values())
    start = corpus.find("\n\n", int(position * len(corpus)))
    text = corpus[start:].lstrip() if start >= 0 else corpus
    while len(text) < n_chars:
        text += "\n\n" + corpus
    return text[:n_chars]


def passkey_prompt(tokenizer, n_tokens: int, depth: float, haystack: str = "austen", seed: int = 0,
                   cache_dir: str | Path | None = None) -> PasskeyPrompt:
    """A chat prompt of ``n_tokens`` tokens (within 2%, usually exact) that hides a pass key in a haystack.

    The user message is the instruction, the haystack with the needle sentence inserted at the sentence boundary
    nearest to relative depth ``depth`` (0 = first, 1 = last), and the question. haystack: "austen" (consecutive
    novel text from a ``seed``-dependent paragraph) or "filler" (a repeated five-sentence filler). The pass key
    and the Austen offset depend only on ``seed``, so a depth sweep keeps both. Needs a fast tokenizer with a
    chat template."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack={haystack!r} must be one of {HAYSTACKS}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("passkey_prompt needs a fast tokenizer (token offsets locate the needle)")
    rng = random.Random(seed)
    digits = rng.choice((5, 6))
    passkey = str(rng.randrange(10 ** (digits - 1), 10**digits))
    needle = needle_sentence(passkey)
    position = rng.random()  # where the Austen haystack starts

    def render(hay: str):
        text = f"{INSTRUCTION}\n\n{_insert_needle(hay, depth, needle)}\n\n{QUESTION}"
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, messages, rendered, tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)

    fixed = len(render("")[3]["input_ids"])
    if n_tokens < fixed + 16:
        raise ValueError(f"n_tokens={n_tokens} is too small: the prompt without haystack already takes {fixed} "
                         f"tokens with this tokenizer (need >= {fixed + 16})")
    n_chars = 6 * n_tokens + 2000
    while True:  # enough source tokens for the haystack (6 characters a token is generous for English)
        src_ids = tokenizer.encode(_haystack_source(haystack, n_chars, position, cache_dir),
                                   add_special_tokens=False)
        if len(src_ids) >= n_tokens + 64:
            break
        n_chars *= 2
    k, best = n_tokens - fixed, None
    for _ in range(10):  # decoding then re-tokenizing shifts the count a little: correct k until it fits
        out = render(tokenizer.decode(src_ids[: max(k, 0)]).strip())
        err = len(out[3]["input_ids"]) - n_tokens
        if best is None or abs(err) < abs(best[0]):
            best = (err, out)
        if err == 0:
            break
        k -= err
    err, (text, messages, rendered, enc) = best
    if abs(err) > 0.02 * n_tokens:
        raise RuntimeError(f"could not fit the prompt to {n_tokens} tokens (closest: {n_tokens + err})")
    start = rendered.find(needle)
    if start < 0 or rendered.count(needle) != 1:
        raise RuntimeError("the chat template does not carry the message verbatim; cannot locate the needle")
    end = start + len(needle)
    offsets = enc["offset_mapping"]
    first = next(i for i, (_, e) in enumerate(offsets) if e > start)
    last = next((i for i, (s, _) in enumerate(offsets) if s >= end), len(offsets))
    return PasskeyPrompt(text, passkey, messages, list(enc["input_ids"]), (first, last))


def answer_has_passkey(text: str, passkey: str) -> bool:
    """Whether a model's answer contains the pass key as a whole number (not inside a longer one)."""
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", text) is not None


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cab_models.text", description="Fetch the Austen text once.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help=f"apt-get download {DEBIAN_PACKAGE} (or read --deb) into the cache; print "
                                     "the cached JSON's path")
    f.add_argument("--deb", type=Path, help=f"a {DEBIAN_PACKAGE}_*.deb already downloaded (no apt-get)")
    f.add_argument("--cache-dir", help="default: $CAB_CACHE_DIR or ~/.cache/cab_vllm")
    a = p.parse_args(argv)
    try:
        print(fetch_austen(a.cache_dir, a.deb))
    except RuntimeError as e:
        raise SystemExit(f"cab_models.text fetch: {e}") from None


if __name__ == "__main__":
    main()
