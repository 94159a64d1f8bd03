"""Metrics (tokensparse.eval.metrics) on hand-made inputs with known values, and the likelihood
metrics on a tiny random model against a hand computation from its full logits."""

import math

import pytest
import torch

from tokensparse.eval import metrics
from tokensparse.testing import tiny_inputs, tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# ---- string match ------------------------------------------------------------------------------


def test_string_match():
    assert metrics.string_match_all("The key is 123 and 456.", ["123", "456"]) == 1.0
    assert metrics.string_match_all("The key is 123.", ["123", "456", "789", "000"]) == 0.25
    assert metrics.string_match_all("ABC", "abc") == 1.0  # case-insensitive, a str is one answer
    assert metrics.string_match_part("only 456", ["123", "456"]) == 1.0
    assert metrics.string_match_part("none", ["123", "456"]) == 0.0
    assert metrics.score("x 123", ["123", "9"], "all") == 0.5
    assert metrics.score("x 123", ["123", "9"], "part") == 1.0
    assert metrics.first_word_match(' "E".\n\nQ: next', ["e"]) == 1.0
    assert metrics.first_word_match(" b\n\nQ:", ["q"]) == 0.0  # "all" would say 1.0 here
    assert metrics.first_word_match("   ", ["q"]) == 0.0
    with pytest.raises(ValueError, match="no gold answers"):
        metrics.string_match_all("x", [])
    with pytest.raises(ValueError, match="unknown metric 'exact'; use one of all, part, first_word"):
        metrics.score("x", ["x"], "exact")


# ---- logit fidelity ------------------------------------------------------------------------------


def test_logit_fidelity_known_values():
    ref = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)],
                        [0.0, 0.0, 5.0]])
    test = torch.tensor([[math.log(0.2), math.log(0.3), math.log(0.5)],
                         [0.0, 0.0, 5.0]])
    kl0 = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.5)
    out = metrics.logit_fidelity(ref, test)
    assert out["positions"] == 2
    assert out["kl"] == pytest.approx(kl0 / 2, abs=1e-6)
    assert out["kl_max"] == pytest.approx(kl0, abs=1e-6)
    assert out["top1"] == 0.5  # row 0: argmax 0 vs 2; row 1 agrees
    # shifting logits by a constant changes nothing; batch shape and chunking do not matter
    same = metrics.logit_fidelity(ref[None], (test + 3.0)[None], chunk=1)
    assert same["kl"] == pytest.approx(out["kl"], abs=1e-6) and same["top1"] == out["top1"]
    ident = metrics.logit_fidelity(ref, ref)
    assert ident["kl"] == 0.0 and ident["top1"] == 1.0


def test_logit_fidelity_zero_reference_probability_and_errors():
    ref = torch.tensor([[0.0, float("-inf")]])  # p_ref = (1, 0): the second token contributes 0
    test = torch.tensor([[0.0, 0.0]])
    assert metrics.logit_fidelity(ref, test)["kl"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        metrics.logit_fidelity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(L, V\) or \(B, L, V\)"):
        metrics.logit_fidelity(torch.zeros(3), torch.zeros(3))


# ---- needle retention ------------------------------------------------------------------------------


def test_needle_retention():
    needles = [10, 11, 12, 13]
    layers = [
        torch.tensor([[0, 10, 11], [12, 13, -1]]),  # (H, k): union over heads = all four
        [torch.tensor([10, 11]), torch.tensor([5, 6, 7])],  # per head: mean(2/4, 0/4)
        None,  # dense layer
        [1, 2, 13],  # a list of ints: one set
    ]
    out = metrics.needle_retention(layers, needles)
    assert out["per_layer"] == [1.0, 0.25, 1.0, 0.25]
    assert out["mean"] == pytest.approx(0.625) and out["min"] == 0.25
    with pytest.raises(ValueError, match="needle_positions is empty"):
        metrics.needle_retention(layers, [])
    with pytest.raises(ValueError, match="no layers"):
        metrics.needle_retention([], needles)


# ---- likelihoods on a tiny model ----------------------------------------------------------------


def _hand_logprobs(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].double()
    return torch.log_softmax(logits, -1)  # (N, V); row p predicts token p + 1


def test_answer_loglik_matches_hand_computation(model):
    ids, _ = tiny_inputs(1, 20, seed=1)
    prompt, answer = ids[:, :15], ids[:, 15:]
    lp = _hand_logprobs(model, ids)
    hand = sum(float(lp[p - 1, ids[0, p]]) for p in range(15, 20))
    for fn in (metrics.prefill_answer_loglik, metrics.answer_loglik):  # one forward / decode path: equal for dense
        assert fn(model, prompt, answer) == pytest.approx(hand, abs=1e-4)
        assert fn(model, prompt[0], answer[0]) == pytest.approx(hand, abs=1e-4)  # 1-D ids
        with pytest.raises(ValueError, match=r"shape \(1, N\)"):
            fn(model, torch.zeros(2, 3, dtype=torch.long), answer)

    def all_positions(input_ids, logits_to_keep=None, **kw):  # a model that ignores logits_to_keep
        return (model(input_ids=input_ids, **kw).logits,)

    assert metrics.prefill_answer_loglik(all_positions, prompt, answer) == pytest.approx(hand, abs=1e-4)


def test_perplexity_single_and_sliding_windows(model):
    ids, _ = tiny_inputs(1, 24, seed=2)
    lp = _hand_logprobs(model, ids)
    nll = [-float(lp[p - 1, ids[0, p]]) for p in range(1, 24)]
    assert metrics.perplexity(model, ids) == pytest.approx(math.exp(sum(nll) / 23), rel=1e-4)

    # window 8, stride 4: each window re-reads up to 4 tokens of context and scores 4 new ones
    expect, scored = [], 1
    for begin in range(0, 24, 4):
        end = min(begin + 8, 24)
        wl = _hand_logprobs(model, ids[:, begin:end])
        expect += [-float(wl[p - begin - 1, ids[0, p]]) for p in range(scored, end)]
        scored = end
        if end == 24:
            break
    assert len(expect) == 23
    got = metrics.perplexity(model, ids, stride=4, window=8)
    assert got == pytest.approx(math.exp(sum(expect) / 23), rel=1e-4)
    with pytest.raises(ValueError, match="stride <= window"):
        metrics.perplexity(model, ids, stride=9, window=8)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        metrics.perplexity(model, ids[:, :1])


def test_peak_rss_is_positive():
    assert metrics.peak_rss_mb() > 1.0
