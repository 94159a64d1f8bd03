"""Task generators (tokensparse.eval.tasks) with a fake word-level tokenizer: prompt length within
tolerance, gold answers present where the task says so and never leaked by the question,
determinism by seed, distinct keys/values/distractors, needle spans and depths."""

import json
import re
from collections import Counter

import pytest

from eval_fakes import CharTokenizer, WordTokenizer
from tokensparse.eval import metrics, tasks

NEEDLE_TASKS = [t for t in tasks.TASKS if t.startswith(("passkey", "niah"))]
DEPTH_TASKS = NEEDLE_TASKS + ["variable_tracking"]
CHAR_TASKS = ["letter_count", "char_position"]


@pytest.fixture(scope="module")
def tok():
    return WordTokenizer()


def _tol(task: str, length: int) -> float:
    return max(0.02 * length, 16) if task in CHAR_TASKS else 0.02 * length


# ---- length ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(tasks.TASKS))
@pytest.mark.parametrize("length", [512, 3000])
def test_prompt_length_within_tolerance(tok, task, length):
    s = tasks.make_samples(task, tok, length, seed=3)[0]
    n = tasks.count_tokens(tok, s.prompt())
    assert abs(n - length) <= _tol(task, length), (task, length, n)
    assert s.metadata["prompt_tokens"] == n
    assert s.length == length and s.prompt() == s.context + s.question + s.answer_prefix


@pytest.mark.parametrize("task", ["passkey", "niah_single_essay", "variable_tracking", "frequent_words"])
def test_length_with_bos_and_char_tokenizer(task):
    """A tokenizer that adds BOS has it counted; a much finer tokenizer still lands in tolerance."""
    for tok in (WordTokenizer(add_bos=True), CharTokenizer()):
        s = tasks.make_samples(task, tok, 2000, seed=0)[0]
        assert abs(tasks.count_tokens(tok, s.prompt()) - 2000) <= 40


def test_too_short_and_bad_arguments(tok):
    with pytest.raises(ValueError, match="too small"):
        tasks.make_samples("common_words", tok, 64)
    with pytest.raises(KeyError, match="unknown task 'nope'; available: passkey"):
        tasks.make_samples("nope", tok, 512)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        tasks.make_samples("passkey", tok, 512, depth=1.5)


# ---- answers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_answers_not_leaked_by_question(tok, task):
    for s in tasks.make_samples(task, tok, 1024, n=2, seed=1):
        if task in CHAR_TASKS:  # one character: it occurs everywhere; the question names the word
            assert s.metadata["word"] in s.question
            continue
        tail = s.question + s.answer_prefix
        assert s.answers and all(a not in tail for a in s.answers), task


@pytest.mark.parametrize("task", [t for t in NEEDLE_TASKS if t != "passkey"])
def test_niah_every_value_exactly_once_and_distractors_distinct(tok, task):
    for s in tasks.make_samples(task, tok, 2048, n=3, seed=2):
        meta = s.metadata
        all_values = [v for vs in meta["values"].values() for v in vs]
        assert len(set(all_values)) == len(all_values)
        assert len(set(meta["keys"])) == len(meta["keys"])
        for v in all_values:  # gold and distractor values: each exactly once in the context
            assert s.context.count(v) == 1, (task, v)
        gold = set(s.answers)
        assert gold == {v for k in meta["query_keys"] for v in meta["values"][k]}
        assert not gold & {v for _, v in meta["distractors"]}
        assert len(meta["distractor_spans"]) == len(meta["distractors"])
        for (a, b), (k, v) in zip(meta["distractor_spans"], meta["distractors"]):
            assert k in s.context[a:b] and v in s.context[a:b]
        if meta["haystack"] == "needle":  # the haystack's own needles use fresh keys
            hay_keys = re.findall(r"for (\S+) is:", s.context)
            assert len(hay_keys) == len(set(hay_keys)) > len(meta["keys"])


def test_passkey_needle_and_key(tok):
    s = tasks.make_samples("passkey", tok, 1024, seed=0, depth=0.5)[0]
    key = s.answers[0]
    assert re.fullmatch(r"\d{5}", key)
    (a, b), = s.metadata["needle_spans"]
    assert s.context[a:b] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert s.context.count(key) == 2  # both mentions are inside the one needle


def test_needle_spans_and_token_positions(tok):
    for task in NEEDLE_TASKS + ["variable_tracking"]:
        s = tasks.make_samples(task, tok, 1024, seed=4, depth=0.3)[0]
        for (a, b), ans in zip(s.metadata["needle_spans"], s.answers):
            text = s.context[a:b]
            assert text == text.strip() and text
            if task != "variable_tracking":
                assert ans in text
    s = tasks.make_samples("passkey", tok, 1024, seed=4, depth=0.3)[0]
    pos = tasks.needle_token_positions(s, tok)
    enc = tok(s.prompt(), return_offsets_mapping=True)
    covered = "".join(tok.decode([enc.input_ids[i]]) for i in pos)
    (a, b), = s.metadata["needle_spans"]
    assert covered.strip() == s.context[a:b]
    assert pos == list(range(pos[0], pos[-1] + 1))


@pytest.mark.parametrize("task", DEPTH_TASKS)
def test_requested_depth_is_where_the_needle_is(tok, task):
    for depth in (0.0, 0.5, 1.0):
        s = tasks.make_samples(task, tok, 4096, seed=5, depth=depth)[0]
        a, _ = s.metadata["needle_spans"][0]
        assert abs(a / len(s.context) - depth) < 0.1, (task, depth, a / len(s.context))
        assert abs(s.metadata["needle_depths"][0] - depth) < 0.1


def test_variable_tracking_chain(tok):
    s = tasks.make_samples("variable_tracking", tok, 2048, seed=0, num_chains=2, num_hops=3)[0]
    chains, values = s.metadata["chains"], s.metadata["chain_values"]
    names = [n for c in chains for n in c]
    assert len(set(names)) == len(names) == 8 and len(set(values)) == 2
    assert s.answers == chains[0]
    # statements appear in chain order; the value appears once (the distractor chain has its own)
    at = [s.context.index(f"VAR {n} =") for n in chains[0]]
    assert at == sorted(at)
    assert s.context.count(values[0]) == 1 and f"VAR {chains[0][0]} = {values[0]}." in s.context


def test_common_words_counts(tok):
    s = tasks.make_samples("common_words", tok, 2048, seed=0)[0]
    words = Counter(re.findall(r"^\d+\. (\w+)$", s.context, flags=re.M))
    fc, fu = s.metadata["freq_common"], s.metadata["freq_uncommon"]
    assert all(words[w] == fc for w in s.answers) and len(s.answers) == 10
    assert max(c for w, c in words.items() if w not in s.answers) <= fu < fc
    assert not any(a in w or w in a for a in s.answers for w in words if w != a)


def test_frequent_words_top3(tok):
    s = tasks.make_samples("frequent_words", tok, 2048, seed=0)[0]
    counts = Counter(s.context.split("\n", 1)[1].split())
    top = [w for w, _ in counts.most_common(4)]
    assert top[:3] == s.answers
    c = [counts[w] for w in top]
    assert c[0] > c[1] > c[2] > c[3]


def test_char_probes_answer_is_correct(tok):
    for seed in range(5):
        s = tasks.make_samples("letter_count", tok, 256, seed=seed)[0]
        m = s.metadata
        assert s.answers == [str(m["word"].count(m["letter"]))]
        s = tasks.make_samples("char_position", tok, 256, seed=seed)[0]
        m = s.metadata
        assert s.answers == [m["word"][m["position"] - 1]]
        assert s.metadata["metric"] == "first_word"
        # the substring match would accept a continuation holding the letter anywhere
        assert metrics.score(f" ? {s.answers[0]}", s.answers, s.metadata["metric"]) == 0.0
        assert metrics.score(f" {s.answers[0].upper()}\n\nQ:", s.answers, s.metadata["metric"]) == 1.0


# ---- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_same_seed_same_samples_other_seed_other_answers(task):
    a = [s.to_dict() for s in tasks.make_samples(task, WordTokenizer(), 1024, n=2, seed=7)]
    b = [s.to_dict() for s in tasks.make_samples(task, WordTokenizer(), 1024, n=2, seed=7)]
    assert a == b
    c = tasks.make_samples(task, WordTokenizer(), 1024, n=2, seed=8)
    assert a[0]["sample_id"] != c[0].sample_id
    if task not in CHAR_TASKS:  # a digit/letter answer may repeat by chance
        assert a[0]["answers"] != c[0].answers and a[0]["answers"] != a[1]["answers"]


def test_sample_json_roundtrip(tok):
    s = tasks.make_samples("niah_multikey", tok, 1024, seed=0)[0]
    back = tasks.Sample.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and isinstance(back.metadata["needle_spans"][0], tuple)


def test_passkey_grid(tok):
    grid = tasks.passkey_grid(tok, [512, 1024], [0.1, 0.9], seed=0)
    assert [(s.length, s.depth) for s in grid] == [(512, 0.1), (512, 0.9), (1024, 0.1), (1024, 0.9)]
    assert len({s.answers[0] for s in grid}) == 4
