"""Synthetic long-context tasks: passkey, RULER-style needle/aggregation tasks, character probes.

Every generator returns :class:`Sample` objects with one schema. A sample's prompt is
``context + question + answer_prefix``: ``context`` is the part a sparse-attention / KV-selection
method may compress, ``question`` and ``answer_prefix`` follow it (a caller may prefill them with the
context or feed them after compressing it).

Length control
    Each generator is given a target ``length`` in tokens of the *full prompt* as measured by
    ``len(tokenizer(sample.prompt()).input_ids)`` with the tokenizer it is given (the bundled
    SmolLM2 tokenizer adds no BOS token; a tokenizer that adds one has it counted). The amount of
    haystack (filler sentences, words of natural text, list items, ...) is searched so that the
    prompt lands within ±2% of ``length``; the count is stored in ``metadata["prompt_tokens"]``.
    The two character probes (``letter_count``, ``char_position``) are built from whole few-shot
    examples (~20 tokens each), so for them the tolerance is ``max(2% of length, 16 tokens)``.
    A length too small for a task's fixed parts raises ``ValueError``.

Determinism
    Each sample draws from its own ``random.Random(sample_id)`` where
    ``sample_id = f"{task}-L{length}-d{depth}-s{seed}-{i}"`` (``depth`` is the requested one,
    ``None`` when random). String seeds are hashed with SHA-512 by :mod:`random`, so samples are
    identical across processes and platforms, independent of ``PYTHONHASHSEED``. The same seed
    gives the same samples; another seed, length, depth or index gives other keys and values.

Needles
    Needle tasks record ``metadata["needle_spans"]``: the ``(char_start, char_end)`` of each
    gold-bearing sentence inside ``context`` (== inside the prompt, which starts with the context),
    without surrounding whitespace. Distractor needles are in ``metadata["distractor_spans"]``.
    :func:`needle_token_positions` maps the gold spans to prompt token indices.

The RULER tasks follow the task definitions of Hsieh et al., "RULER: What's the Real Context Size
of Your Long-Context Language Models?" (arXiv:2404.06654) with our own wording of the templates;
no few-shot demonstration is prepended to variable tracking / common words (RULER adds one).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import os
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .corpus import load_lines

__all__ = [
    "Sample",
    "TASKS",
    "DEPTH_TASKS",
    "make_samples",
    "passkey_grid",
    "needle_token_positions",
    "load_tokenizer",
    "count_tokens",
]


# --------------------------------------------------------------------------------------------------
# schema


@dataclass
class Sample:
    """One evaluation prompt with its gold answers (see the module docstring for the conventions)."""

    task: str
    sample_id: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    length: int
    seed: int
    depth: float | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> str:
        return self.context + self.question + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        meta = dict(d.get("metadata") or {})
        for key in ("needle_spans", "distractor_spans"):
            if key in meta:
                meta[key] = [tuple(s) for s in meta[key]]
        return cls(**{**d, "metadata": meta})


# --------------------------------------------------------------------------------------------------
# tokenizer helpers


@functools.lru_cache(maxsize=None)
def load_tokenizer(path: str | os.PathLike | None = None):
    """The tokenizer of the bundled SmolLM2 model (or of a local HF model directory), cached.

    It uses the same files as :func:`tokensparse.models.load_model` (the converted copy of the
    bundled GGUF, converting it first if needed) without loading the weights.
    """
    from transformers import AutoTokenizer

    from .. import models

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if path is None:
        try:
            gguf = models.bundled_gguf_path()
            target = models._converted_dir(gguf)
            if not (target / "tokensparse-source.json").is_file():
                models._convert_gguf(gguf, target)
        except AttributeError:  # the loader's internals changed: fall back to the public entry point
            return models.load_model()[1]
        src = str(target)
    else:
        src = str(path)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def count_tokens(tokenizer, text: str) -> int:
    """Token count as the harness measures it: ``len(tokenizer(text).input_ids)``."""
    return len(tokenizer(text).input_ids)


def needle_token_positions(sample: Sample, tokenizer, spans: Sequence[tuple[int, int]] | None = None) -> list[int]:
    """Indices of the tokens of ``tokenizer(sample.prompt())`` whose characters overlap a needle.

    ``spans`` defaults to ``sample.metadata["needle_spans"]``. Needs a fast tokenizer
    (``return_offsets_mapping``). Tokens with an empty offset (special tokens) never match.
    """
    if spans is None:
        spans = sample.metadata.get("needle_spans")
    if not spans:
        raise ValueError(f"sample {sample.sample_id} has no needle spans")
    enc = tokenizer(sample.prompt(), return_offsets_mapping=True)
    out = []
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if e <= s:
            continue
        if any(s < span_end and e > span_start for span_start, span_end in spans):
            out.append(i)
    return out


# --------------------------------------------------------------------------------------------------
# vocabularies (ours), haystacks and the length fitter

NOISE_SENTENCES = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)

_ADJECTIVES = (
    "amber ancient brave bright calm clever crimson curious daring distant eager elegant fancy fierce "
    "gentle gifted golden graceful happy hidden humble icy jolly kind lively lucky lunar mellow merry "
    "mighty misty modern noble odd olive patient polite proud quiet rapid rustic scarlet shiny silent "
    "silver sleepy smooth solar spicy steady sturdy sunny swift tidy tiny velvet vivid wandering wise "
    "witty young zealous"
).split()

_NOUNS = (
    "anchor apricot badger balloon banjo beacon blanket bicycle biscuit bramble bucket button cactus "
    "canoe carpet castle cello chimney compass cookie cricket crystal cupboard dolphin dragon engine "
    "falcon feather ferry fiddle garnet glacier goblet hammock harbor helmet hedgehog island jacket "
    "kettle kitten ladder lantern lemon lizard magnet marble meadow mitten monkey mustard napkin nutmeg "
    "orchard otter paddle pebble pelican pepper piano pillow pirate pocket puzzle quilt rabbit radish "
    "ribbon rocket saddle sandal scooter shovel spider sponge squirrel teapot thimble tiger tractor "
    "trumpet tulip turnip umbrella violin walnut wagon walrus whistle window yogurt zebra"
).split()


@functools.lru_cache(maxsize=None)
def _corpus_vocab(min_count: int = 3, max_count: int = 300, min_len: int = 4, max_len: int = 10) -> tuple[str, ...]:
    """Lower-case words of the KJV corpus in a middle frequency band (no names, few function words)."""
    counts: dict[str, int] = {}
    for line in load_lines("kjv"):
        for w in re.findall(r"\b[a-z]+\b", line):
            counts[w] = counts.get(w, 0) + 1
    return tuple(sorted(w for w, c in counts.items() if min_count <= c <= max_count and min_len <= len(w) <= max_len))


def _nearest(bounds: Sequence[int], x: float) -> int:
    """The element of the sorted ``bounds`` closest to ``x`` (ties go to the smaller one)."""
    i = bisect.bisect_left(bounds, x)
    if i == 0:
        return bounds[0]
    if i == len(bounds):
        return bounds[-1]
    lo, hi = bounds[i - 1], bounds[i]
    return lo if x - lo <= hi - x else hi


class _Noise:
    """Repeated filler sentences; needles may go before any sentence whose index is a multiple of ``step``."""

    def __init__(self, step: int = 1):
        self.step = step

    def atoms(self, n: int) -> list[str]:
        return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n)]

    def boundaries(self, n: int) -> list[int]:
        b = list(range(0, n + 1, self.step))
        if b[-1] != n:
            b.append(n)
        return b


class _Essay:
    """Consecutive KJV verses from a random verse on (wrapping around), as words; needles go between verses."""

    def __init__(self, rng: random.Random, corpus: str = "kjv"):
        self.lines = load_lines(corpus)
        self.next_line = rng.randrange(len(self.lines))
        self.words: list[str] = []
        self.verse_starts: list[int] = []

    def _ensure(self, n: int) -> None:
        while len(self.words) < n:
            self.verse_starts.append(len(self.words))
            self.words.extend(" " + w for w in self.lines[self.next_line % len(self.lines)].split())
            self.next_line += 1

    def atoms(self, n: int) -> list[str]:
        self._ensure(n)
        return self.words[:n]

    def boundaries(self, n: int) -> list[int]:
        self._ensure(n)
        b = self.verse_starts[: bisect.bisect_right(self.verse_starts, n)]
        if not b or b[-1] != n:
            b.append(n)
        return b


class _LazyPool:
    """``get(i)``: the i-th item of an endless deterministic sequence ``make(rng), make(rng), ...``
    (drawn on demand, so the first items do not depend on how many are asked for)."""

    def __init__(self, rng: random.Random, make: Callable[[random.Random], Any]):
        self.rng, self.make, self.items = rng, make, []

    def get(self, i: int):
        while len(self.items) <= i:
            self.items.append(self.make(self.rng))
        return self.items[i]


class _NeedleHaystack:
    """A haystack made of distractor needles (RULER's MK-NIAH-2/3). Size ``n`` means ``n // per``
    needles followed by ``n % per`` filler sentences, ``per`` being about how many filler sentences
    one needle is worth in tokens: the few trailing sentences give the length fit its precision.

    Sizes and boundaries are in filler-sentence *units* (as :func:`_assemble` assumes when it puts
    a needle at ``depth * n``): needle ``i`` is the atom at index ``i * per``, followed by
    ``per - 1`` empty atoms, so atom indices and units coincide."""

    def __init__(self, pool: _LazyPool, render: Callable[[Any], str], per: int):
        self.pool, self.render, self.per = pool, render, max(1, per)

    def atoms(self, n: int) -> list[str]:
        m, r = divmod(n, self.per)
        out: list[str] = []
        for i in range(m):
            out.append(self.render(self.pool.get(i)))
            out.extend([""] * (self.per - 1))
        return out + _Noise().atoms(r)

    def boundaries(self, n: int) -> list[int]:
        m = n // self.per
        b = list(range(0, m * self.per + 1, self.per))
        return b + ([n] if n > b[-1] else [])


def _assemble(header: str, hay, n: int, needles: Sequence[tuple[str, float]]):
    """``header`` + the first ``n`` haystack atoms with each needle ``(text, depth)`` inserted at the
    allowed boundary nearest to ``depth * n``. Needles at the same boundary keep their list order.
    Returns ``(context, spans, realized_depths)`` (spans without surrounding whitespace)."""
    atoms = hay.atoms(n)
    bounds = hay.boundaries(n)
    placed = sorted((_nearest(bounds, d * n), j) for j, (_, d) in enumerate(needles))
    parts, pos, ai = [header], len(header), 0
    spans: list[tuple[int, int]] = [(0, 0)] * len(needles)
    depths = [0.0] * len(needles)
    for b, j in placed:
        chunk = "".join(atoms[ai:b])
        parts.append(chunk)
        pos += len(chunk)
        ai = b
        text = needles[j][0]
        lead = len(text) - len(text.lstrip())
        spans[j] = (pos + lead, pos + len(text.rstrip()))
        depths[j] = b / n if n else 0.0
        parts.append(text)
        pos += len(text)
    parts.append("".join(atoms[ai:]))
    return "".join(parts), spans, depths


def _fit(tokenizer, length: int, build: Callable[[int], tuple[str, Any]], tail: str, *, task: str,
         n_min: int = 0, abs_tol: int = 0):
    """Find the size ``n >= n_min`` whose ``build(n)[0] + tail`` has the token count nearest ``length``.

    ``build`` must be a pure function of ``n`` whose token count grows (nearly) monotonically.
    Returns ``(n, context, extra, tokens)``; raises ``ValueError`` when not within tolerance.
    """
    memo: dict[int, tuple[int, str, Any]] = {}

    def f(n: int) -> int:
        if n not in memo:
            ctx, extra = build(n)
            memo[n] = (count_tokens(tokenizer, ctx + tail), ctx, extra)
        return memo[n][0]

    tol = max(0.02 * length, abs_tol)
    if f(n_min) > length + tol:
        raise ValueError(
            f"{task}: length={length} is too small; the fixed parts of the prompt already take {f(n_min)} tokens"
        )
    lo, hi = n_min, max(n_min + 1, 16)
    while f(hi) < length:
        lo, hi = hi, hi * 2
        if hi > 50_000_000:
            raise ValueError(f"{task}: cannot reach length={length}")
    while hi - lo > 1:  # smallest n with f(n) >= length lies in (lo, hi]
        mid = (lo + hi) // 2
        if f(mid) >= length:
            hi = mid
        else:
            lo = mid
    best = min(range(max(n_min, hi - 2), hi + 3), key=lambda n: (abs(f(n) - length), n))
    if abs(f(best) - length) > tol:
        raise ValueError(f"{task}: could not fit length={length} (closest {f(best)} tokens)")
    tokens, ctx, extra = memo[best]
    return best, ctx, extra, tokens


def _max_new_tokens(tokenizer, answers: Sequence[str]) -> int:
    """Room for every gold string, separators and a little slack."""
    return count_tokens(tokenizer, " " + ", ".join(answers)) + 2 * len(answers) + 6


def _sample_id(task: str, length: int, depth: float | None, seed: int, index: int) -> str:
    return f"{task}-L{length}-d{depth}-s{seed}-{index}"


def _check_depth(depth: float | None) -> None:
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


# --------------------------------------------------------------------------------------------------
# passkey (Mohtashami & Jaggi, "Landmark Attention", 2023 protocol)

PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key?"
PASSKEY_ANSWER_PREFIX = " The pass key is"


def passkey(tokenizer, length: int, *, seed: int = 0, index: int = 0, depth: float | None = None,
            task: str = "passkey") -> Sample:
    """The pass key retrieval task: a 5-digit key in repeated filler, inserted between two
    repetitions of the five-sentence filler at fraction ``depth`` of the filler."""
    _check_depth(depth)
    sid = _sample_id(task, length, depth, seed, index)
    rng = random.Random(sid)
    key = str(rng.randint(10000, 99999))
    d = rng.random() if depth is None else depth
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    hay = _Noise(step=len(NOISE_SENTENCES))
    tail = PASSKEY_QUESTION + PASSKEY_ANSWER_PREFIX

    def build(n: int):
        ctx, spans, depths = _assemble(PASSKEY_HEADER, hay, n, [(needle, d)])
        return ctx, (spans, depths)

    _, context, (spans, depths), tokens = _fit(tokenizer, length, build, tail, task=task)
    return Sample(
        task=task, sample_id=sid, context=context, question=PASSKEY_QUESTION,
        answer_prefix=PASSKEY_ANSWER_PREFIX, answers=[key], max_new_tokens=8, length=length, seed=seed,
        depth=d,
        metadata={"needle_spans": spans, "distractor_spans": [], "needle_depths": depths,
                  "prompt_tokens": tokens, "metric": "all", "haystack": "noise"},
    )


# --------------------------------------------------------------------------------------------------
# RULER needle-in-a-haystack family

_VALUE_TYPES = {"number": ("number", "numbers"), "uuid": ("uuid", "uuids"), "phrase": ("phrase", "phrases")}

#: words per ``"phrase"`` value, and the fewest answer tokens one must take (more words are added
#: until it does, so a long-answer sample always needs >= this many decode steps to answer)
PHRASE_WORDS = 12
PHRASE_MIN_TOKENS = 16


def _make_value(kind: str) -> Callable[[random.Random], str]:
    if kind == "number":
        return lambda r: str(r.randint(1_000_000, 9_999_999))
    if kind == "uuid":
        return lambda r: str(uuid.UUID(int=r.getrandbits(128), version=4))
    if kind == "phrase":
        vocab = _corpus_vocab()
        return lambda r: " ".join(r.choice(vocab) for _ in range(PHRASE_WORDS))
    raise ValueError(f"unknown value type {kind!r}; use one of {sorted(_VALUE_TYPES)}")


def _make_key(kind: str) -> Callable[[random.Random], str]:
    if kind == "word":
        return lambda r: f"{r.choice(_ADJECTIVES)}-{r.choice(_NOUNS)}"
    if kind == "uuid":
        return _make_value("uuid")
    raise ValueError(f"unknown key type {kind!r}; use 'word' or 'uuid'")


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


#: natural-text haystacks: name -> corpus (``"essay"`` is the historical name of the KJV one);
#: ``"natural"`` alternates the shipped corpora by sample index (even: KJV, odd: Devil's Dictionary)
NATURAL_HAYSTACKS = {"essay": "kjv", "kjv": "kjv", "devil": "devil"}
_NATURAL_ROTATION = ("kjv", "devil")


def _haystack_corpus(kind: str, index: int) -> str | None:
    """The corpus a haystack kind reads (``None`` for the synthetic ones)."""
    if kind == "natural":
        return _NATURAL_ROTATION[index % len(_NATURAL_ROTATION)]
    return NATURAL_HAYSTACKS.get(kind)


def _make_haystack(kind: str, rng: random.Random, index: int = 0):
    if kind == "noise":
        return _Noise()
    corpus = _haystack_corpus(kind, index)
    if corpus is not None:
        return _Essay(rng, corpus)
    raise ValueError(f"unknown haystack {kind!r}; use 'noise', 'natural', 'kjv', 'devil' or 'essay' "
                     "(or 'needle' for the NIAH tasks)")


def niah(tokenizer, length: int, *, seed: int = 0, index: int = 0, depth: float | None = None,
         task: str = "niah_single", haystack: str = "noise", value_type: str = "number",
         key_type: str = "word", num_keys: int = 1, num_values: int = 1, num_queries: int = 1,
         own_line: bool = False) -> Sample:
    """RULER's NIAH family in one generator.

    ``num_keys`` keys are hidden, each with ``num_values`` distinct values, one needle sentence
    per (key, value); the question asks for every value of the first ``num_queries`` keys. So
    single = (1, 1, 1), multikey = (4, 1, 1), multivalue = (1, 4, 1), multiquery = (4, 1, 4).
    Needles of the other keys are distractors. ``haystack``: ``"noise"`` (the repeated filler),
    natural text (``"kjv"`` / ``"essay"``, ``"devil"``, or ``"natural"``: KJV for even sample
    indices, the Devil's Dictionary for odd ones) or ``"needle"`` (the haystack is itself made of
    distractor needles with fresh keys, RULER's MK-NIAH-2/3). Every key and value is distinct and
    each value occurs exactly once in the context. ``depth`` places the first gold needle; the
    others go at random depths. ``value_type``: ``"number"`` (7 digits), ``"uuid"`` or ``"phrase"``
    (:data:`PHRASE_WORDS` corpus words, lengthened until the gold phrase takes at least
    :data:`PHRASE_MIN_TOKENS` tokens: the long-answer task, whose every answer token must be
    retrieved again at decode time).
    """
    _check_depth(depth)
    if value_type not in _VALUE_TYPES:
        raise ValueError(f"unknown value type {value_type!r}; use one of {sorted(_VALUE_TYPES)}")
    if not 1 <= num_queries <= num_keys or num_values < 1:
        raise ValueError("need 1 <= num_queries <= num_keys and num_values >= 1")
    sid = _sample_id(task, length, depth, seed, index)
    rng = random.Random(sid)
    singular, plural = _VALUE_TYPES[value_type]
    make_key, make_value = _make_key(key_type), _make_value(value_type)

    used: set[str] = set()

    def fresh(make):
        while True:
            x = make(rng)
            if x not in used:
                used.add(x)
                return x

    if value_type == "phrase":
        base_make = make_value

        def make_value(r: random.Random) -> str:
            v = base_make(r)
            vocab = _corpus_vocab()
            while count_tokens(tokenizer, " " + v) - 1 < PHRASE_MIN_TOKENS:  # (-1: the leading space's share)
                v += " " + r.choice(vocab)
            return v

    keys = [fresh(make_key) for _ in range(num_keys)]
    values = {k: [fresh(make_value) for _ in range(num_values)] for k in keys}
    queried = keys[:num_queries]

    def render(k: str, v: str) -> str:
        if own_line:
            return f"\nOne special magic {singular} for {k} is: {v}.\n"
        return f" One special magic {singular} for {k} is: {v}."

    gold = [(k, v) for k in queried for v in values[k]]
    distractors = [(k, v) for k in keys[num_queries:] for v in values[k]]
    pairs = gold + distractors
    order_depths = [rng.random() for _ in pairs]
    if depth is not None:
        order_depths[0] = depth
    needles = [(render(k, v), dd) for (k, v), dd in zip(pairs, order_depths)]

    if haystack == "needle":
        # the haystack's own needles get fresh keys and values, distinct from each other and from the above
        def make_pair(r: random.Random) -> tuple[str, str]:
            k, v = fresh_from(r, make_key), fresh_from(r, make_value)
            return (k, v)

        def fresh_from(r: random.Random, make) -> str:
            for _ in range(10_000):
                x = make(r)
                if x not in used:
                    used.add(x)
                    return x
            raise ValueError(f"{task}: ran out of distinct keys; ask for a shorter length")

        pool = _LazyPool(random.Random(sid + "|haystack"), make_pair)
        sentence = count_tokens(tokenizer, "".join(NOISE_SENTENCES)) / len(NOISE_SENTENCES)
        per = round(count_tokens(tokenizer, render(make_key(random.Random(0)), make_value(random.Random(1)))) / sentence)
        hay = _NeedleHaystack(pool, lambda kv: render(*kv), per)
    else:
        hay = _make_haystack(haystack, rng, index)

    header = (
        f"A long text follows. Hidden in it are some special magic {plural}; "
        "remember them, because you will be asked about them at the end.\n"
    )
    keys_txt = _join_keys(queried)
    if num_queries == 1 and num_values == 1:
        question = f"\nWhat is the special magic {singular} for {keys_txt} mentioned in the text above?"
        answer_prefix = f" The special magic {singular} for {keys_txt} mentioned in the text above is"
    else:
        question = f"\nWhat are all the special magic {plural} for {keys_txt} mentioned in the text above?"
        answer_prefix = f" The special magic {plural} for {keys_txt} mentioned in the text above are"

    def build(n: int):
        ctx, spans, depths = _assemble(header, hay, n, needles)
        return ctx, (spans, depths)

    n, context, (spans, depths), tokens = _fit(tokenizer, length, build, question + answer_prefix, task=task)
    answers = [v for _, v in gold]
    meta = {
        "needle_spans": spans[: len(gold)],
        "distractor_spans": spans[len(gold):],
        "needle_depths": depths[: len(gold)],
        "distractor_depths": depths[len(gold):],
        "keys": keys,
        "query_keys": queried,
        "values": {k: list(v) for k, v in values.items()},
        "distractors": [list(p) for p in distractors],
        "haystack": haystack,
        "corpus": _haystack_corpus(haystack, index),
        "value_type": value_type,
        "key_type": key_type,
        "prompt_tokens": tokens,
        "metric": "all",
    }
    if haystack == "needle":
        meta["haystack_needles"], meta["haystack_noise_sentences"] = divmod(n, hay.per)
    return Sample(
        task=task, sample_id=sid, context=context, question=question, answer_prefix=answer_prefix,
        answers=answers, max_new_tokens=_max_new_tokens(tokenizer, answers), length=length, seed=seed,
        depth=order_depths[0], metadata=meta,
    )


# --------------------------------------------------------------------------------------------------
# variable tracking


def _var_name(r: random.Random) -> str:
    return "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def variable_tracking(tokenizer, length: int, *, seed: int = 0, index: int = 0, depth: float | None = None,
                      task: str = "variable_tracking", num_chains: int = 1, num_hops: int = 4,
                      haystack: str = "noise", own_line: bool = False) -> Sample:
    """RULER's variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops``
    hops, so ``num_hops + 1`` variables) hidden in order in the haystack, plus ``num_chains - 1``
    distractor chains with other values; the answer is every variable of the first chain.
    ``depth`` places the first statement of the gold chain; its other statements follow at random
    later depths. Variable names (5 capital letters) and chain values (5 digits) are all distinct."""
    _check_depth(depth)
    if num_chains < 1 or num_hops < 1:
        raise ValueError("num_chains and num_hops must be >= 1")
    sid = _sample_id(task, length, depth, seed, index)
    rng = random.Random(sid)
    names: set[str] = set()
    chain_values: list[str] = []
    chains: list[list[str]] = []
    for _ in range(num_chains):
        chain = []
        while len(chain) < num_hops + 1:
            name = _var_name(rng)
            if name not in names:
                names.add(name)
                chain.append(name)
        chains.append(chain)
        while True:
            v = str(rng.randint(10000, 99999))
            if v not in chain_values:
                chain_values.append(v)
                break

    needles: list[tuple[str, float]] = []
    for c, (chain, value) in enumerate(zip(chains, chain_values)):
        if c == 0 and depth is not None:
            ds = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in range(num_hops))
        else:
            ds = sorted(rng.random() for _ in range(num_hops + 1))
        lead, tail = ("\n", "\n") if own_line else (" ", "")
        needles.append((f"{lead}VAR {chain[0]} = {value}.{tail}", ds[0]))
        for h in range(1, num_hops + 1):
            needles.append((f"{lead}VAR {chain[h]} = VAR {chain[h - 1]}.{tail}", ds[h]))
    hay = _make_haystack(haystack, rng, index)
    header = "Memorize and track the chains of variable assignments hidden in the following text.\n"
    value = chain_values[0]
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    answer_prefix = (
        f" Answer: Following the assignments in the text above, {num_hops + 1} variables "
        f"hold the value {value}, namely:"
    )

    def build(n: int):
        ctx, spans, depths = _assemble(header, hay, n, needles)
        return ctx, (spans, depths)

    _, context, (spans, depths), tokens = _fit(tokenizer, length, build, question + answer_prefix, task=task)
    k = num_hops + 1
    answers = list(chains[0])
    return Sample(
        task=task, sample_id=sid, context=context, question=question, answer_prefix=answer_prefix,
        answers=answers, max_new_tokens=_max_new_tokens(tokenizer, answers), length=length, seed=seed,
        depth=needles[0][1],
        metadata={"needle_spans": spans[:k], "distractor_spans": spans[k:], "needle_depths": depths[:k],
                  "chains": chains, "chain_values": chain_values, "value": value, "haystack": haystack,
                  "corpus": _haystack_corpus(haystack, index),
                  "prompt_tokens": tokens, "metric": "all"},
    )


# --------------------------------------------------------------------------------------------------
# aggregation: common words (CWE) and frequent coded words (FWE)


def common_words(tokenizer, length: int, *, seed: int = 0, index: int = 0, depth: float | None = None,
                 task: str = "common_words", num_common: int = 10, freq_common: int | None = None,
                 freq_uncommon: int = 3) -> Sample:
    """RULER's common words extraction: a numbered list of words in which ``num_common`` words occur
    ``freq_common`` times each and every other word at most ``freq_uncommon`` times; the answer is
    the common words. ``freq_common`` defaults to RULER's 30 from 4K tokens on and is scaled down
    below (``max(2 * freq_uncommon + 2, round(30 * length / 4096))``) so short prompts still fit.
    The length is tuned by the number of uncommon occurrences (the last uncommon word may occur
    fewer than ``freq_uncommon`` times). Words come from the KJV corpus vocabulary; no word of the
    list is a substring of a common word or contains one. ``depth`` does not apply."""
    sid = _sample_id(task, length, depth, seed, index)
    rng = random.Random(sid)
    if freq_common is None:
        freq_common = 30 if length >= 4096 else max(2 * freq_uncommon + 2, round(30 * length / 4096))
    if freq_common <= freq_uncommon:
        raise ValueError("freq_common must exceed freq_uncommon")
    vocab = list(_corpus_vocab())
    rng.shuffle(vocab)
    common: list[str] = []
    rest: list[str] = []
    for w in vocab:
        if len(common) < num_common:
            if not any(w in c or c in w for c in common):
                common.append(w)
        elif not any(w in c or c in w for c in common):
            rest.append(w)

    header = (
        "Below is a numbered list of words. Some of the words appear more often than the others; "
        "memorize the ones that appear most often.\n"
    )
    question = f"\nQuestion: What are the {num_common} most common words in the list above?"
    answer_prefix = f" Answer: The {num_common} words that appear most often in the list are:"

    def build(n: int):
        if n > len(rest) * freq_uncommon:
            raise ValueError(f"{task}: the vocabulary is too small for length={length}")
        items = [w for w in common for _ in range(freq_common)]
        full, part = divmod(n, freq_uncommon)
        items += [w for w in rest[:full] for _ in range(freq_uncommon)]
        if part:
            items += [rest[full]] * part
        random.Random(f"{sid}|order|{n}").shuffle(items)
        body = "".join(f"\n{i + 1}. {w}" for i, w in enumerate(items))
        return header + body.lstrip("\n"), (full + (1 if part else 0))

    _, context, n_uncommon, tokens = _fit(tokenizer, length, build, question + answer_prefix, task=task)
    return Sample(
        task=task, sample_id=sid, context=context, question=question, answer_prefix=answer_prefix,
        answers=list(common), max_new_tokens=_max_new_tokens(tokenizer, common), length=length, seed=seed,
        depth=None,
        metadata={"freq_common": freq_common, "freq_uncommon": freq_uncommon, "num_uncommon_words": n_uncommon,
                  "prompt_tokens": tokens, "metric": "all"},
    )


def _coded_word(r: random.Random) -> str:
    return "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))


def _zipf_counts(n: int, vocab_size: int, alpha: float) -> list[int]:
    weights = [1.0 / (r ** alpha) for r in range(1, vocab_size + 1)]
    total = sum(weights)
    counts = [math.floor(n * w / total) for w in weights]
    for i in (2, 1, 0):  # the top three strictly above the rest and each other
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def frequent_words(tokenizer, length: int, *, seed: int = 0, index: int = 0, depth: float | None = None,
                   task: str = "frequent_words", vocab_size: int = 100, alpha: float = 2.0) -> Sample:
    """RULER's frequent words extraction: a text of random 5-letter "coded words" whose frequencies
    follow a Zipf law (exponent ``alpha``, ``vocab_size`` words); the answer is the three most
    frequent, whose counts are strictly decreasing and above the fourth. ``depth`` does not apply."""
    if vocab_size < 4:
        raise ValueError("vocab_size must be >= 4")
    sid = _sample_id(task, length, depth, seed, index)
    rng = random.Random(sid)
    words: list[str] = []
    while len(words) < vocab_size:
        w = _coded_word(rng)
        if w not in words:
            words.append(w)
    header = (
        "Read the coded text below and keep count of how often each coded word appears. "
        "You will be asked for the three most frequent coded words.\n"
    )
    question = "\nQuestion: What are the three most frequently appearing coded words in the coded text above?"
    answer_prefix = " Answer: According to the coded text above, the three most frequent coded words are:"

    def build(n: int):
        counts = _zipf_counts(n, vocab_size, alpha)
        items = [w for w, c in zip(words, counts) for _ in range(c)]
        random.Random(f"{sid}|order|{n}").shuffle(items)
        return header + " ".join(items), counts

    _, context, counts, tokens = _fit(tokenizer, length, build, question + answer_prefix, task=task, n_min=1)
    answers = words[:3]
    return Sample(
        task=task, sample_id=sid, context=context, question=question, answer_prefix=answer_prefix,
        answers=answers, max_new_tokens=_max_new_tokens(tokenizer, answers), length=length, seed=seed,
        depth=None,
        metadata={"counts": {w: c for w, c in zip(words, counts) if c}, "alpha": alpha,
                  "prompt_tokens": tokens, "metric": "all"},
    )


# --------------------------------------------------------------------------------------------------
# character-level probes (few-shot; the tolerance is max(2%, 16 tokens))

_CHAR_ABS_TOL = 16


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _char_vocab() -> list[str]:
    return [w for w in _corpus_vocab() if 4 <= len(w) <= 10]


def _letter_count_item(r: random.Random, word: str) -> tuple[str, str, dict]:
    if r.random() < 0.85:
        letter = r.choice(word)
    else:
        letter = r.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
    q = f'Q: How many times does the letter "{letter}" appear in the word "{word}"?\n'
    return q, str(word.count(letter)), {"word": word, "letter": letter}


def _char_position_item(r: random.Random, word: str) -> tuple[str, str, dict]:
    k = r.randint(1, len(word))
    q = f'Q: What is the {_ordinal(k)} letter of the word "{word}"?\n'
    return q, word[k - 1], {"word": word, "position": k}


def _char_task(tokenizer, length: int, *, seed: int, index: int, depth: float | None, task: str,
               header: str, make_item) -> Sample:
    sid = _sample_id(task, length, depth, seed, index)
    rng = random.Random(sid)
    vocab = _char_vocab()
    target_word = rng.choice(vocab)
    question, answer, info = make_item(rng, target_word)
    shots_rng = random.Random(sid + "|shots")
    shots: list[str] = []

    def shot(i: int) -> str:
        while len(shots) <= i:
            w = shots_rng.choice(vocab)
            if w == target_word:
                continue
            q, a, _ = make_item(shots_rng, w)
            shots.append(f"{q}A: {a}\n\n")
        return shots[i]

    answer_prefix = "A:"

    def build(n: int):
        return header + "".join(shot(i) for i in range(n)), n

    _, context, n_shots, tokens = _fit(tokenizer, length, build, question + answer_prefix, task=task,
                                       abs_tol=_CHAR_ABS_TOL)
    return Sample(
        task=task, sample_id=sid, context=context, question=question, answer_prefix=answer_prefix,
        answers=[answer], max_new_tokens=3, length=length, seed=seed, depth=None,
        # a one-character answer occurs in almost any continuation: score the first word instead
        metadata={**info, "num_shots": n_shots, "prompt_tokens": tokens, "metric": "first_word"},
    )


def letter_count(tokenizer, length: int = 128, *, seed: int = 0, index: int = 0, depth: float | None = None,
                 task: str = "letter_count") -> Sample:
    """How many times a letter occurs in a word (answer: a digit; 0 for ~15% of the questions).
    The context is few-shot examples of the same question on other words."""
    return _char_task(tokenizer, length, seed=seed, index=index, depth=depth, task=task,
                      header="Answer each question about the spelling of a word with a single number.\n\n",
                      make_item=_letter_count_item)


def char_position(tokenizer, length: int = 128, *, seed: int = 0, index: int = 0, depth: float | None = None,
                  task: str = "char_position") -> Sample:
    """The k-th letter of a word (answer: one lower-case letter), with few-shot examples as context."""
    return _char_task(tokenizer, length, seed=seed, index=index, depth=depth, task=task,
                      header="Answer each question about the spelling of a word with a single letter.\n\n",
                      make_item=_char_position_item)


# --------------------------------------------------------------------------------------------------
# registry

TASKS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    # RULER S-NIAH-1/2/3
    "niah_single": functools.partial(niah, task="niah_single"),
    "niah_single_number": functools.partial(niah, task="niah_single_number", haystack="noise", value_type="number"),
    "niah_single_essay": functools.partial(niah, task="niah_single_essay", haystack="essay", value_type="number"),
    "niah_single_uuid": functools.partial(niah, task="niah_single_uuid", haystack="essay", value_type="uuid"),
    # RULER MK-NIAH-1/2/3
    "niah_multikey": functools.partial(niah, task="niah_multikey", haystack="essay", num_keys=4),
    "niah_multikey_needle": functools.partial(niah, task="niah_multikey_needle", haystack="needle", num_keys=1),
    "niah_multikey_uuid": functools.partial(niah, task="niah_multikey_uuid", haystack="needle", num_keys=1,
                                            key_type="uuid", value_type="uuid"),
    # RULER MV-NIAH, MQ-NIAH
    "niah_multivalue": functools.partial(niah, task="niah_multivalue", haystack="essay", num_values=4),
    "niah_multiquery": functools.partial(niah, task="niah_multiquery", haystack="essay", num_keys=4, num_queries=4),
    "variable_tracking": variable_tracking,
    # the standard suite's tasks (v2): natural-text haystacks from both shipped corpora (alternating
    # by sample index), distractors, several answers, long answers
    "needle_number": functools.partial(niah, task="needle_number", haystack="natural", value_type="number"),
    "needle_uuid": functools.partial(niah, task="needle_uuid", haystack="natural", value_type="uuid"),
    "multikey": functools.partial(niah, task="multikey", haystack="natural", num_keys=4),
    "multivalue": functools.partial(niah, task="multivalue", haystack="natural", num_values=4),
    "multiquery": functools.partial(niah, task="multiquery", haystack="natural", num_keys=4, num_queries=4),
    "vartrack": functools.partial(variable_tracking, task="vartrack", haystack="natural", num_chains=2,
                                  num_hops=2),
    "long_answer": functools.partial(niah, task="long_answer", haystack="natural", value_type="phrase",
                                     num_keys=2),
    "common_words": common_words,
    "frequent_words": frequent_words,
    "letter_count": letter_count,
    "char_position": char_position,
}


#: tasks whose ``depth`` argument places a needle (the others ignore it)
DEPTH_TASKS = frozenset(
    name for name in TASKS
    if name == "passkey" or name.startswith("niah") or name in ("variable_tracking", "vartrack", "needle_number",
                                                                  "needle_uuid", "multikey", "multivalue",
                                                                  "multiquery", "long_answer"))


def make_samples(task: str, tokenizer, length: int, n: int = 1, seed: int = 0, depth: float | None = None,
                 **options) -> list[Sample]:
    """``n`` samples of ``task`` (a key of :data:`TASKS`) at prompt ``length`` tokens; ``options``
    go to the generator (e.g. ``haystack="essay"``, ``value_type="uuid"``, ``num_keys=8``)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    gen = TASKS[task]
    return [gen(tokenizer, length, seed=seed, index=i, depth=depth, **options) for i in range(n)]


def passkey_grid(tokenizer, lengths: Sequence[int], depths: Sequence[float], seed: int = 0) -> list[Sample]:
    """One passkey sample per (length, depth), lengths outer; each cell has its own key."""
    return [passkey(tokenizer, int(L), seed=seed, index=0, depth=float(d)) for L in lengths for d in depths]
