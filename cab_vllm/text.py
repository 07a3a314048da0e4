"""Natural text offline: Jane Austen's six novels from Debian's r-cran-janeaustenr, and passkey prompts.

The Debian package ships the books as an R lazy-load database (data/Rdata.rdx + Rdata.rdb). The .rdx is a
gzip'd R serialization of list(variables = list(name = c(offset, length)), ...); each object in the .rdb is a
4-byte big-endian uncompressed length followed by a zlib stream of its own R serialization. ``RReader`` reads
the XDR serialization format (versions 2 and 3) for the types such data holds.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from cab_vllm.models import _locked, cache_root

BOOKS = {  # R variable -> title
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

NA_STRING = None


class RObject(list):
    """An R vector or list with its attributes (names, class, ...) in ``attrs``."""

    def __init__(self, items=(), attrs=None):
        super().__init__(items)
        self.attrs = attrs or {}


class RReader:
    """Reader of R's XDR serialization (the "X\\n" format, versions 2 and 3)."""

    NIL, SYM, LIST, CLO, ENV, PROM, LANG, CHAR = 0, 1, 2, 3, 4, 5, 6, 9
    LGL, INT, REAL, CPLX, STR, VEC, EXPR, RAW = 10, 13, 14, 15, 16, 19, 20, 24
    REF, NILVALUE, GLOBALENV, UNBOUND, MISSINGARG, BASENS, EMPTYENV, BASEENV = 255, 254, 253, 252, 251, 247, 242, 241
    NA_INT = -(2**31)

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {data[:2]!r})")
        self.pos = 2
        self.version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if self.version == 3:
            n = self.int()  # native encoding name: length, then bytes
            self.pos += n
        elif self.version != 2:
            raise ValueError(f"unsupported R serialization version {self.version}")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def ints(self, n: int) -> list[int]:
        v = struct.unpack_from(f">{n}i", self.data, self.pos)
        self.pos += 4 * n
        return list(v)

    def doubles(self, n: int) -> list[float]:
        v = struct.unpack_from(f">{n}d", self.data, self.pos)
        self.pos += 8 * n
        return list(v)

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def read(self):
        flags = self.int()
        typ, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if typ == self.NILVALUE or typ == self.NIL:
            return None
        if typ in (self.GLOBALENV, self.EMPTYENV, self.BASEENV, self.BASENS, self.UNBOUND, self.MISSINGARG):
            return None
        if typ == self.REF:
            idx = flags >> 8
            return self.refs[(idx if idx else self.int()) - 1]
        if typ == self.SYM:
            name = self.read()  # a CHARSXP
            self.refs.append(name)
            return name
        if typ == self.CHAR:
            n = self.int()
            if n == -1:
                return NA_STRING
            s = self.data[self.pos : self.pos + n]
            self.pos += n
            enc = "latin-1" if flags & (1 << (12 + 2)) else "utf-8"  # LATIN1_MASK: bit 2 of the levels
            return s.decode(enc, errors="replace")
        if typ in (self.LIST, self.LANG):  # pairlist: (attr) (tag) car cdr
            items, names = [], []
            attrs = None
            while True:
                if has_attr:
                    attrs = self.read()
                tag = self.read() if has_tag else None
                items.append(self.read())
                names.append(tag)
                nflags = self.int()
                ntyp = nflags & 0xFF
                if ntyp not in (self.LIST, self.LANG):
                    self.pos -= 4
                    self.read()  # the terminating cdr (usually NILVALUE)
                    break
                has_attr, has_tag = bool(nflags & (1 << 9)), bool(nflags & (1 << 10))
            out = RObject(items, {"names": names})
            if isinstance(attrs, RObject):
                out.attrs.update(self._attrs(attrs))
            return out
        if typ == self.ENV:
            self.int()  # locked
            env = RObject()
            self.refs.append(env)
            self.read(), self.read(), self.read()  # enclosure, frame, hash table
            attrs = self.read()
            if isinstance(attrs, RObject):
                env.attrs.update(self._attrs(attrs))
            return env
        if typ == self.STR:
            n = self.length()
            out = RObject(self.read() for _ in range(n))
        elif typ in (self.VEC, self.EXPR):
            n = self.length()
            out = RObject(self.read() for _ in range(n))
        elif typ in (self.INT, self.LGL):
            vals = self.ints(self.length())
            if typ == self.LGL:
                out = RObject(None if v == self.NA_INT else bool(v) for v in vals)
            else:
                out = RObject(None if v == self.NA_INT else v for v in vals)
        elif typ == self.REAL:
            out = RObject(self.doubles(self.length()))
        elif typ == self.RAW:
            n = self.length()
            out = RObject(self.data[self.pos : self.pos + n])
            self.pos += n
        else:
            raise ValueError(f"unsupported R SEXP type {typ} at byte {self.pos - 4}")
        if has_attr:
            attrs = self.read()
            if isinstance(attrs, RObject):
                out.attrs.update(self._attrs(attrs))
        return out

    @staticmethod
    def _attrs(pairlist: RObject) -> dict:
        return {name: val for name, val in zip(pairlist.attrs.get("names", []), pairlist)}


def read_rds_bytes(data: bytes):
    """Parse one R serialization stream (already decompressed)."""
    return RReader(data).read()


def read_lazyload(rdx: Path, rdb: Path) -> dict:
    """{variable: R object} of an R lazy-load database (.rdx index + .rdb objects)."""
    raw = rdx.read_bytes()
    index = read_rds_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    fields = dict(zip(index.attrs["names"], index))
    variables = fields["variables"]
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.attrs["names"], variables):
        chunk = blob[int(offset) : int(offset) + int(length)]
        body = chunk[4:]
        if body[:1] in (b"Z", b"2", b"X", b"0"):  # typed compression (R >= 2.10): Z=zlib, 0=none
            kind, body = body[:1], body[1:]
            if kind == b"2" or kind == b"X":
                raise ValueError(f"{name}: bzip2/xz lazy-load compression is not supported")
            data = zlib.decompress(body) if kind == b"Z" else body
        else:
            data = zlib.decompress(body)
        out[name] = read_rds_bytes(data)
    return out


def austen_books(cache_dir: str | Path | None = None) -> dict[str, str]:
    """{title: full text} of the six novels (about 4.0 M characters), cached as JSON after the first call."""
    root = cache_root(cache_dir)
    cached = root / "text" / "austen.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with _locked(root / "locks" / "austen.lock"):
        if cached.exists():
            return json.loads(cached.read_text())
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            proc = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:  # a fresh machine may need its package lists first
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
                proc = subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, capture_output=True,
                                      text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"apt-get download r-cran-janeaustenr failed: {proc.stderr[-1000:]}")
            deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
            data = next(Path(tmp, "x").rglob("janeaustenr/data"))
            objs = read_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
        books = {}
        for var, title in BOOKS.items():
            if var not in objs:
                raise RuntimeError(f"janeaustenr data lacks {var!r}; found {sorted(objs)}")
            books[title] = "\n".join("" if line is None else line for line in objs[var])
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmpf = cached.with_suffix(".tmp")
        tmpf.write_text(json.dumps(books))
        tmpf.replace(cached)
    return books


# ----------------------------------------------------------------------------------------------------
# passkey prompts
# ----------------------------------------------------------------------------------------------------
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey retrieval prompt. input_ids: the chat-templated tokens; needle_token_span: [start, end)
    token indices of the needle sentence inside input_ids."""

    text: str
    passkey: str
    messages: list
    input_ids: list
    needle_token_span: tuple


def _needle(passkey: str) -> str:
    return f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "


def passkey_prompt(tokenizer, n_tokens: int, depth: float, haystack: str = "austen", seed: int = 0,
                   cache_dir: str | Path | None = None) -> PasskeyPrompt:
    """A chat prompt of about ``n_tokens`` tokens (within 2%) hiding a 5-digit pass key at relative ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if haystack not in ("austen", "filler"):
        raise ValueError(f"haystack={haystack!r} must be 'austen' or 'filler'")
    if n_tokens < 256:
        raise ValueError(f"n_tokens={n_tokens} is too small for a passkey prompt (>= 256)")
    rng = random.Random(seed)
    passkey = str(rng.randint(10000, 99999))
    needle = _needle(passkey)

    def build(hay_ids: list[int]):
        cut = int(round(depth * len(hay_ids)))
        before, after = tokenizer.decode(hay_ids[:cut]), tokenizer.decode(hay_ids[cut:])
        text = INSTRUCTION + before + needle + after + QUESTION
        msgs = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return text, msgs, list(ids), before

    if haystack == "filler":
        source = FILLER * (n_tokens // 8 + 64)
    else:
        text = "\n".join(austen_books(cache_dir).values())
        start = rng.randrange(0, max(1, len(text) - 8 * n_tokens))
        source = text[start : start + 8 * n_tokens]
    src_ids = tokenizer.encode(source, add_special_tokens=False)
    budget = n_tokens - 120  # instruction, needle, question, chat template
    for _ in range(6):
        out = build(src_ids[: max(0, budget)])
        err = len(out[2]) - n_tokens
        if abs(err) <= 0.02 * n_tokens:
            break
        budget -= err
    text, msgs, ids, before = out
    if abs(len(ids) - n_tokens) > 0.02 * n_tokens:
        raise RuntimeError(f"could not fit the prompt to {n_tokens} tokens (got {len(ids)})")
    span = _find_span(tokenizer, ids, passkey)
    return PasskeyPrompt(text, passkey, msgs, ids, span)


def _find_span(tokenizer, ids: list[int], passkey: str) -> tuple[int, int]:
    """Token span [start, end) of the needle sentence, from 'The pass key is <key>' to the end of '<key> is the
    pass key', found by bisecting decoded prefix lengths (robust to how the tokenizer merges digits)."""
    text = tokenizer.decode(ids)
    first = text.find(f"The pass key is {passkey}")
    if first < 0:
        raise RuntimeError("needle not found in the decoded prompt")
    tail = f"{passkey} is the pass key"
    last = text.find(tail, first) + len(tail)

    def first_prefix_reaching(chars: int) -> int:  # smallest i with len(decode(ids[:i])) >= chars
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tokenizer.decode(ids[:mid])) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    return first_prefix_reaching(first + 1) - 1, first_prefix_reaching(last)


def answer_has_passkey(text: str, passkey: str) -> bool:
    """Whether a model's answer contains the pass key as a whole number."""
    import re

    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", text) is not None
