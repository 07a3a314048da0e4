"""Experiment E: a RULER-style long-context task suite, generated locally with Austen's novels as the haystack.

Tasks (RULER's synthetic retrieval, tracking and aggregation tasks, scored by its string-match metric):

    single      one needle "The special magic {kind} for {key} is: {value}."; kind: number (7 digits), word, uuid
                (8-4-4 hex)
    multikey    the real needle plus distractor needles of other keys; asks for the real key
    multivalue  several values for one key; answer: all of them
    multiquery  several keys asked at once; answer: all their values
    vartrack    chained assignments "VAR A = 12345." "VAR B = VAR A." ... (plus a distractor chain); answer: every
                variable holding the value
    freqwords   a numbered list of synthetic words, three of them far more frequent (RULER's common words, no
                haystack); answer: those three

Depth places the asked needle (the first of a chain) at that relative position of the haystack, at the nearest
sentence boundary; the other needles spread evenly over the haystack (vartrack: the chain's later links spread
between the depth and the end, in order). freqwords has no depth (None). A prompt is fitted to a target token
count with a tokenizer function passed in (exact when the haystack is split into the tokenizer's own pieces), so
one seed gives the same keys, values and Austen offset at every length and depth, and every policy of a sweep
reads the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from cab_experiments.common import Deadline, Jsonl, Variant, calibrate_keys, cells, check_lengths, run_cell
from cab_models.text import _SENTENCE_END, _haystack_source

TASKS = ("single", "multikey", "multivalue", "multiquery", "vartrack", "freqwords")
KINDS = ("number", "word", "uuid")
KEY = ("model", "yarn", "task", "length", "depth", "trial", "variant", "sparsity", "dense_threshold")
MAX_NEW_TOKENS = {"single": 32, "multikey": 32, "multivalue": 96, "multiquery": 96, "vartrack": 48,
                  "freqwords": 48}  # greedy answers stop at EOS; these bound the longest correct one
DISTRACTORS = 3  # multikey: other keys
VALUES = 4  # multivalue: values of the one key
QUERIES = 4  # multiquery: keys asked
HOPS = 4  # vartrack: a chain of HOPS + 1 variables; one distractor chain of the same length
TOP = 3  # freqwords: the words asked for
TOLERANCE = 0.03  # a prompt has between (1 - TOLERANCE) * length and length tokens

ADJECTIVES = ("amber", "brisk", "cobalt", "dusky", "eager", "fabled", "gilded", "hollow", "ivory", "jovial",
              "kindly", "lofty", "mellow", "nimble", "opal", "placid", "quiet", "rustic", "silver", "tawny",
              "umber", "velvet", "wistful", "yonder", "zesty", "crimson", "frosty", "gentle", "humble", "misty")
NOUNS = ("anchor", "beacon", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island", "jasmine",
         "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quill", "river", "saddle", "thistle",
         "valley", "willow", "zephyr", "compass", "fountain", "glacier", "hammock", "lighthouse", "minnow", "parcel")
VALUE_WORDS = ("abacus", "bagpipe", "cactus", "dolphin", "eggplant", "flamingo", "gondola", "harmonica", "iguana",
               "jukebox", "kangaroo", "lemonade", "mango", "noodle", "octopus", "pelican", "quartz", "raccoon",
               "saxophone", "tangerine", "ukulele", "volcano", "walrus", "xylophone", "yogurt", "zucchini",
               "avocado", "broccoli", "chameleon", "dynamo", "espresso", "falafel", "giraffe", "hazelnut", "igloo",
               "jaguar", "koala", "licorice", "mongoose", "nutmeg", "origami", "pistachio", "radish", "sardine",
               "toboggan", "unicorn", "vanilla", "wombat")  # none occurs in Austen's novels
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_VAR_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels: a variable name is never an English word


@dataclass(frozen=True)
class TaskItem:
    """One generated prompt.

    prompt: the user message (instruction, context, question); answer_prefix: what the assistant's turn starts
    with, so the answer is generated next; text: ``chat(prompt, answer_prefix)``, what the model reads, of
    n_tokens tokens; answers: the expected strings; needles: the sentences inserted into the haystack (empty for
    freqwords); context_span: (start, end) of the context (haystack with needles, or the word list) in prompt;
    kind: the needle's value kind (None for vartrack and freqwords)."""

    task: str
    length: int
    depth: float | None
    seed: int
    kind: str | None
    prompt: str
    answer_prefix: str
    text: str
    n_tokens: int
    answers: tuple[str, ...]
    needles: tuple[str, ...]
    context_span: tuple[int, int]

    def score(self, output: str) -> float:
        return string_match(output, self.answers)


def string_match(output: str, answers) -> float:
    """RULER's string-match score: the fraction of ``answers`` found in ``output`` (case-insensitive substrings)."""
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer functions: a whitespace stand-in for tests, the model's own for runs
# ----------------------------------------------------------------------------------------------------------------
def word_count(text: str) -> int:
    return len(text.split())


def word_pieces(text: str) -> list[str]:
    """``text`` cut into words, each with its trailing whitespace (joining them gives ``text`` back)."""
    lead = text[: len(text) - len(text.lstrip())]
    pieces = re.findall(r"\S+\s*", text)
    return [lead + pieces[0], *pieces[1:]] if pieces and lead else pieces


def plain(prompt: str, answer_prefix: str) -> str:
    return f"{prompt}\n\n{answer_prefix}"


def hf_functions(tok) -> tuple[Callable[[str], int], Callable[[str, str], str], Callable[[str], list[str]]]:
    """(count, chat, split) for a fast Hugging Face tokenizer with a chat template: the rendered chat with the
    answer prefix appended after the generation prompt, counted without extra special tokens (as niah does),
    and text cut into the tokenizer's own pieces so a prompt fits its length exactly."""

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def chat(prompt: str, answer_prefix: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + answer_prefix

    def split(text: str) -> list[str]:
        starts = [s for s, e in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                  if e > s]
        starts = [0, *starts[1:]] if starts else [0]
        return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)]) if b > a]

    return count, chat, split


# ----------------------------------------------------------------------------------------------------------------
# needles and haystack
# ----------------------------------------------------------------------------------------------------------------
def _distinct(rng: random.Random, make: Callable[[], str], n: int, avoid=()) -> list[str]:
    """``n`` values from ``make()`` of which none is a substring of another (or of ``avoid``): a correct answer
    never scores a different one."""
    out: list[str] = []
    taken = [a.lower() for a in avoid]
    while len(out) < n:
        v = make()
        lv = v.lower()
        if not any(lv in t or t in lv for t in taken):
            out.append(v)
            taken.append(lv)
    return out


def _value_maker(rng: random.Random, kind: str) -> Callable[[], str]:
    if kind == "number":
        return lambda: str(rng.randrange(10**6, 10**7))
    if kind == "word":
        return lambda: rng.choice(VALUE_WORDS)
    if kind == "uuid":
        return lambda: f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}"
    raise ValueError(f"kind={kind!r} must be one of {KINDS}")


def _key_maker(rng: random.Random) -> Callable[[], str]:
    return lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _spread(m: int) -> list[float]:
    """``m`` depths spread evenly over the haystack."""
    return [(i + 0.5) / m for i in range(m)]


def insert_needles(hay: str, placed: list[tuple[float, str]]) -> str:
    """``hay`` with each (depth, sentence) inserted at the sentence boundary nearest to relative position depth;
    sentences that share a boundary keep their order in ``placed``."""
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(hay)), len(hay)]
    at: dict[int, list[str]] = {}
    for d, s in placed:
        at.setdefault(min(cuts, key=lambda c: abs(c - d * len(hay))), []).append(s)
    out, prev = [], 0
    for cut in sorted(at):
        group = " ".join(at[cut])
        if cut == 0:
            out.append(f"{group} " if hay else group)
        elif cut == len(hay):
            out += [hay[prev:cut], f" {group}"]
        else:
            out += [hay[prev:cut], group, hay[cut - 1]]  # hay[cut - 1] is the whitespace ending the sentence
        prev = cut
    out.append(hay[prev:])
    return "".join(out)


def _fit(user: Callable[[int], str], measure: Callable[[str], int], target: int, kmax: int,
         what: str) -> tuple[str, int]:
    """(prompt, tokens) of the ``user(k)`` with the most tokens <= ``target`` (``measure(prompt)``) that a secant
    search on the unit count k finds (usually exactly ``target`` when one unit is one token)."""
    fixed = measure(user(0))
    if target < fixed + 16:
        raise ValueError(f"length={target} is too small for {what}: its prompt without context already takes "
                         f"{fixed} tokens (need >= {fixed + 16})")
    k, best, seen = min(target - fixed, kmax), None, set()
    while k not in seen and len(seen) < 16:
        seen.add(k)
        prompt = user(k)
        n = measure(prompt)
        if n <= target and (best is None or n > best[1]):
            best = (prompt, n)
        if n == target:
            break
        rate = (n - fixed) / k if k else 1.0
        step = round((target - n) / max(rate, 1e-3)) or (1 if n < target else -1)
        k = max(0, min(kmax, k + step))
    if best is None or best[1] < (1 - TOLERANCE) * target:
        raise RuntimeError(f"could not fit {what} to {target} tokens (closest: {best and best[1]})")
    return best


# ----------------------------------------------------------------------------------------------------------------
# the tasks: needles, question, answers
# ----------------------------------------------------------------------------------------------------------------
def _needle(kind: str, key: str, value: str) -> str:
    return f"The special magic {kind} for {key} is: {value}."


def _retrieval(task: str, rng: random.Random, depth: float) -> dict:
    kind = rng.choice(KINDS)
    value = _value_maker(rng, kind)
    kinds = f"{kind}s"
    if task in ("single", "multikey"):
        keys = _distinct(rng, _key_maker(rng), 1 + (DISTRACTORS if task == "multikey" else 0))
        values = _distinct(rng, value, len(keys), avoid=keys)
        needles = [_needle(kind, k, v) for k, v in zip(keys, values)]
        answers, asked = values[:1], keys[0]
        question = f"What is the special magic {kind} for {asked} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {asked} mentioned in the provided text is"
    elif task == "multivalue":
        (asked,) = _distinct(rng, _key_maker(rng), 1)
        answers = _distinct(rng, value, VALUES, avoid=[asked])
        needles = [_needle(kind, asked, v) for v in answers]
        question = f"What are all the special magic {kinds} for {asked} mentioned in the provided text?"
        prefix = f"The special magic {kinds} for {asked} mentioned in the provided text are"
    else:  # multiquery
        keys = _distinct(rng, _key_maker(rng), QUERIES)
        answers = _distinct(rng, value, QUERIES, avoid=keys)
        needles = [_needle(kind, k, v) for k, v in zip(keys, answers)]
        asked = ", ".join(keys[:-1]) + f", and {keys[-1]}"
        question = f"What are all the special magic {kinds} for {asked} mentioned in the provided text?"
        prefix = f"The special magic {kinds} for {asked} mentioned in the provided text are"
    others = needles[1:]
    rng.shuffle(others)
    return dict(kind=kind, answers=answers, needles=needles,
                placed=[(depth, needles[0]), *zip(_spread(len(others)), others)],
                head=f"Some special magic {kinds} are hidden within the following text. Make sure to memorize "
                     f"it. I will quiz you about the {kinds} afterwards.",
                question=question, prefix=prefix)


def _vartrack(rng: random.Random, depth: float) -> dict:
    names = _distinct(rng, lambda: "".join(rng.choices(_VAR_LETTERS, k=5)), 2 * (HOPS + 1))
    value, other = _distinct(rng, lambda: str(rng.randrange(10**4, 10**5)), 2)
    chain, decoy = names[: HOPS + 1], names[HOPS + 1:]

    def links(vs: list[str], v: str) -> list[str]:
        return [f"VAR {vs[0]} = {v}.", *(f"VAR {b} = VAR {a}." for a, b in zip(vs, vs[1:]))]

    real, fake = links(chain, value), links(decoy, other)
    placed = [(depth + (1 - depth) * i / (HOPS + 1), s) for i, s in enumerate(real)]
    placed += [(0.05 + 0.9 * i / HOPS, s) for i, s in enumerate(fake)]
    return dict(kind=None, answers=chain, needles=real + fake, placed=placed,
                head="Memorize and track the chain(s) of variable assignment hidden in the following text.",
                question=f"Question: Find all variables that are assigned the value {value} in the text above.",
                prefix=f"Answer: According to the chain(s) of variable assignment in the text above, {HOPS + 1} "
                       f"variables are assigned the value {value}, they are:")


def _pseudowords(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct six-letter consonant-vowel words (equal length: none is a substring of another)."""
    seen: set[str] = set()
    out = []
    while len(out) < n:
        w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _freqwords(rng: random.Random, length: int, seed: int) -> dict:
    common_n, rare_n = min(30, max(6, length // 200)), 3  # RULER: 30 and 3 occurrences
    pool = _pseudowords(rng, TOP + length // rare_n + 16)
    common, rare = pool[:TOP], pool[TOP:]

    def listing(m: int) -> str:
        ws = common * common_n + rare[:m] * rare_n
        random.Random(f"freqwords:{seed}:{m}").shuffle(ws)
        return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(ws))

    return dict(kind=None, answers=common, needles=[], units=listing, kmax=len(rare),
                head="Below is a numbered list of words. In these words, some appear more often than others. "
                     "Memorize the ones that appear most often.",
                question=f"Question: What are the {TOP} most common words in the above list?",
                prefix=f"Answer: The top {TOP} words that appear most often in the list are:")


def make_item(task: str, length: int, depth: float | None = 0.5, seed: int = 0,
              count: Callable[[str], int] = word_count, chat: Callable[[str, str], str] = plain,
              split: Callable[[str], list[str]] = word_pieces, corpus: str | None = None) -> TaskItem:
    """A ``task`` prompt of ``length`` tokens (``count(text)``, between (1 - TOLERANCE) * length and length) whose
    asked needle sits at relative ``depth`` of the Austen haystack (ignored by freqwords: depth None).

    count: tokens of a text; chat: (user prompt, answer prefix) -> the text the model reads; split: text -> its
    pieces (joined back verbatim), the unit the haystack is cut at (hf_functions gives all three for a tokenizer;
    the defaults are a whitespace stand-in). corpus: haystack source instead of the six novels. Everything but
    the haystack's length depends only on (task, seed)."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    rng = random.Random(f"{task}:{seed}")
    if task == "freqwords":
        spec, depth = _freqwords(rng, length, seed), None
    else:
        if depth is None or not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must be in [0, 1] for {task}")
        spec = _vartrack(rng, depth) if task == "vartrack" else _retrieval(task, rng, depth)
        position = rng.random()  # where the Austen haystack starts
        n_chars = 6 * length + 2000
        while True:  # enough source pieces (6 characters a token is generous for English)
            pieces = split(_haystack_source("austen", n_chars, position, None, corpus=corpus))
            if len(pieces) >= length + 64:
                break
            n_chars *= 2
        spec.update(units=lambda k: insert_needles("".join(pieces[:k]).strip(), spec["placed"]), kmax=len(pieces))
    head, question, prefix = spec["head"], spec["question"], spec["prefix"]
    prompt, n = _fit(lambda k: f"{head}\n\n{spec['units'](k)}\n\n{question}", lambda p: count(chat(p, prefix)),
                     length, spec["kmax"], task)
    return TaskItem(task, length, depth, seed, spec["kind"], prompt, prefix, chat(prompt, prefix), n,
                    tuple(spec["answers"]), tuple(spec["needles"]), (len(head) + 2, len(prompt) - len(question) - 2))


# ----------------------------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------------------------
def build_items(tok, task: str, length: int, depths, trials: int, seed: int = 0, corpus: str | None = None,
                functions=None) -> list[dict]:
    """One item per (depth, trial) (freqwords: per trial, depth None); trial t uses seed ``seed + t``.
    functions: (count, chat, split), default ``hf_functions(tok)``; input_ids: ``tok`` on the item's text."""
    count, chat, split = functions or hf_functions(tok)
    out = []
    for t in range(trials):
        for d in ([None] if task == "freqwords" else depths):
            item = make_item(task, length, d, seed + t, count, chat, split, corpus)
            ids = tok(item.text, add_special_tokens=False)["input_ids"]
            out.append({"task": task, "depth": d, "trial": t, "item": item, "input_ids": list(ids)})
    return out


def _result(it: dict, answer: str) -> dict:
    item = it["item"]
    return {"kind": item.kind, "seed": item.seed, "answers": list(item.answers), "answer": answer.strip()[:300],
            "score": item.score(answer)}


def run_tasks(model, tok, model_name: str, out: Jsonl, tasks, lengths, depths, trials: int,
              variants: list[Variant], sparsities, yarn: float | None = None, max_new_tokens: int | None = None,
              batch_tokens: int = 131072, impl: str = "auto", seed: int = 0, time_budget: float | None = None,
              progress: bool = True, corpus: str | None = None) -> int:
    """Run tasks x lengths x depths x trials x (variant, sparsity), appending one row per prompt and cell to
    ``out`` (niah's rows plus task, kind, answers, score; cells already there are skipped). Every cell reads
    the same prompts. max_new_tokens: None = MAX_NEW_TOKENS of each task. Returns the number of rows written;
    stops early (cleanly, between batches) at ``time_budget``."""
    from tqdm.auto import tqdm

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad} (expected some of {', '.join(TASKS)})")
    check_lengths(model, lengths)
    calibrate_keys(model, tok, variants, max(lengths), corpus)
    todo = cells(variants, sparsities)
    deadline, written = Deadline(time_budget), 0
    per_length = sum(trials * (1 if t == "freqwords" else len(depths)) for t in tasks)
    bar = tqdm(total=len(lengths) * per_length * len(todo), desc=f"tasks {model_name}", disable=not progress)
    for n in lengths:
        items = {t: build_items(tok, t, n, depths, trials, seed, corpus) for t in tasks}
        base = dict(model=model_name, yarn=yarn, length=n)
        for variant, sp in todo:
            for t in tasks:
                w, stopped = run_cell(model, tok, out, items[t], variant, sp, base, ("task", "depth", "trial"),
                                      _result, max_new_tokens or MAX_NEW_TOKENS[t], batch_tokens, impl, deadline,
                                      bar)
                written += w
                if stopped:
                    bar.close()
                    return written
    bar.close()
    return written


def score_table(rows: list[dict]) -> dict:
    """{(model, yarn, task, variant, sparsity): {length: mean score}} over depths and trials."""
    acc: dict = {}
    for r in rows:
        c = acc.setdefault((r["model"], r.get("yarn"), r["task"], r["variant"], r["sparsity"]), {})
        c.setdefault(r["length"], []).append(r["score"])
    return {k: {n: sum(s) / len(s) for n, s in sorted(v.items())} for k, v in acc.items()}
