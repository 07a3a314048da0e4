"""Prompts of a target length in tokens, distinct from each other so a prefix cache cannot serve them.

Text: Jane Austen's novels through ``cab_models.text.austen_books`` (natural text; cached after the first call),
else a seeded synthetic word stream. Each prompt starts with a tag ``[request NONCE-I]`` and at its own seeded
offset in the text. The nonce differs between runs (random unless given), so no two prompts sent to one server
share a prefix: vLLM's prefix cache would otherwise serve a repeated prompt from the cache and the TTFT would
measure nothing. The same seed gives the same text, so a dense run and a CAB run see the same inputs up to the
tag.

Token counts: an exact count needs the server's tokenizer. In order of preference: a Hugging Face tokenizer
(``--tokenizer``, needs transformers), the server's ``POST /tokenize`` (vLLM's api_server has it), else
characters / 4 (English BPE averages about 4 characters a token) with a warning. The server's ``usage`` in each
response is recorded as the real prompt length either way.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass

import httpx

TEXTS = ("auto", "austen", "synthetic")
CHARS_PER_TOKEN = 4.0
_WORDS = (
    "the of and to in that was her it his she he you had as with for not be is at on but my him all have by "
    "which so this from they were me would could there been one when their said what no an if more much very "
    "must will should than such time any lady sister house letter morning evening walk garden town country "
    "friend family mother father brother daughter young little great good long first last own other every "
    "thought felt knew saw heard spoke replied answered returned wished hoped feared believed seemed looked "
    "soon again never always perhaps indeed quite rather really almost however though while before after"
).split()


@dataclass(frozen=True)
class TokenCounter:
    """count(text) -> tokens; name says how ('hf:<path>', 'server', 'chars/4'); exact is False for the estimate."""

    count: Callable[[str], int]
    name: str
    exact: bool


def hf_counter(tokenizer: str) -> TokenCounter:
    """Count with a Hugging Face tokenizer (a local folder or a hub id), special tokens included as the
    completions endpoint adds them."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise RuntimeError("--tokenizer needs the transformers package; leave it out to count with the "
                           "server's /tokenize endpoint") from None
    tok = AutoTokenizer.from_pretrained(tokenizer)
    return TokenCounter(lambda text: len(tok(text, add_special_tokens=True)["input_ids"]), f"hf:{tokenizer}", True)


def server_counter(base_url: str, model: str, headers: dict[str, str] | None = None,
                   timeout: float = 60.0) -> TokenCounter | None:
    """Count with the server's ``POST /tokenize`` (vLLM); None when the server has no such endpoint."""
    client = httpx.Client(base_url=server_root(base_url), headers=headers or {}, timeout=timeout)

    def count(text: str) -> int:
        r = client.post("/tokenize", json={"model": model, "prompt": text})
        r.raise_for_status()
        return int(r.json()["count"])

    try:
        count("probe")
    except (httpx.HTTPError, KeyError, ValueError):
        client.close()
        return None
    return TokenCounter(count, "server", True)


def heuristic_counter() -> TokenCounter:
    return TokenCounter(lambda text: max(1, round(len(text) / CHARS_PER_TOKEN)), "chars/4", False)


def server_root(base_url: str) -> str:
    """http://host:port from http://host:port or http://host:port/v1 (with or without a trailing slash)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def corpus(text: str, seed: int = 0, min_chars: int = 2_000_000) -> tuple[str, str]:
    """(corpus, source name). text: 'austen', 'synthetic' or 'auto' (Austen when cab_vllm can provide it)."""
    if text not in TEXTS:
        raise ValueError(f"text={text!r} must be one of {TEXTS}")
    if text in ("auto", "austen"):
        try:
            from cab_models.text import austen_books

            return "\n\n".join(austen_books().values()), "austen"
        except (ImportError, RuntimeError, OSError) as e:
            if text == "austen":
                raise RuntimeError(f"Austen text unavailable ({e}); use --text synthetic") from None
            print(f"loadtests: Austen text unavailable ({type(e).__name__}: {e}); using synthetic text",
                  file=sys.stderr)
    rng = random.Random(seed)
    words, n = [], 0
    while n < min_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18)))
        words.append(sentence[0].upper() + sentence[1:] + ".")
        n += len(words[-1]) + 1
    return " ".join(words), "synthetic"


def fit_prompt(head: str, body: str, n_tokens: int, counter: TokenCounter, max_iter: int = 12) -> tuple[str, int]:
    """``head`` + the longest whitespace-cut prefix of ``body`` whose count is closest to ``n_tokens``.

    Secant steps on the character length (the tokens-per-character ratio of a text is nearly constant), then
    word-by-word steps. Returns (prompt, counted tokens)."""
    if counter.count(head) > n_tokens:
        raise ValueError(f"prompt_tokens={n_tokens} is shorter than the prompt tag {head!r}")

    def make(n_chars: int) -> str:
        n_chars = max(0, min(n_chars, len(body)))
        cut = body.rfind(" ", 0, n_chars + 1) if n_chars < len(body) else n_chars
        return head + body[: max(cut, 0)]

    n_chars = int(n_tokens * CHARS_PER_TOKEN)
    best: tuple[int, str, int] | None = None
    seen: set[int] = set()
    for _ in range(max_iter):
        prompt = make(n_chars)
        size = len(prompt) - len(head)
        if size in seen:  # a cycle between two neighbouring cuts: keep the best of them
            break
        seen.add(size)
        got = counter.count(prompt)
        if best is None or abs(got - n_tokens) < best[0]:
            best = (abs(got - n_tokens), prompt, got)
        if got == n_tokens:
            break
        if got < n_tokens and size >= len(body) - 1:
            raise ValueError(f"the text ({len(body)} characters) is too short for a {n_tokens}-token prompt")
        step = round((n_tokens - got) * size / max(got - counter.count(head), 1))
        if abs(n_tokens - got) <= 2 or step == 0:  # close: move one whitespace boundary at a time
            nxt = body.find(" ", size + 1)
            n_chars = (nxt if nxt >= 0 else len(body)) if got < n_tokens else max(body.rfind(" ", 0, size), 0)
        else:
            n_chars = size + step
    assert best is not None
    return best[1], best[2]


@dataclass(frozen=True)
class Prompt:
    text: str
    tokens: int  # counted with the counter (exact or estimated)


def build_prompts(n: int, n_tokens: int, counter: TokenCounter, text: str = "auto", seed: int = 0,
                  nonce: str = "0") -> tuple[list[Prompt], str]:
    """``n`` prompts of about ``n_tokens`` tokens each, distinct from their first tokens on (tag
    ``[request NONCE-I] ``); the text depends on ``seed`` only. Returns (prompts, text source)."""
    if n < 1 or n_tokens < 1:
        raise ValueError(f"need n >= 1 and n_tokens >= 1 (got n={n}, n_tokens={n_tokens})")
    body_all, source = corpus(text, seed)
    need = int(n_tokens * CHARS_PER_TOKEN * 3) + 1000  # room for the search; tokens rarely exceed ~3x that
    while len(body_all) < 2 * need:
        body_all += "\n\n" + body_all
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(0, len(body_all) - need)
        start = body_all.find(" ", start) + 1  # start on a word
        prompt, got = fit_prompt(f"[request {nonce}-{i}] ", body_all[start: start + need], n_tokens, counter)
        out.append(Prompt(prompt, got))
    return out, source
