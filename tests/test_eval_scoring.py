"""The decode-path scorer (tokensparse.eval.scoring) and the prefill-only one it replaces for
decode-time and eviction methods: equal to dense where they must be, different where a method
drops what the answer needs, refused where the one-forward number would silently be dense's."""

from dataclasses import dataclass

import pytest
import torch

import tokensparse as ts
from eval_fakes import model, tok  # noqa: F401 (pytest fixtures shared by the eval tests)
from tokensparse.engine.config import param
from tokensparse.engine.executors import dense_attention
from tokensparse.engine import Method
from tokensparse.eval import metrics, scoring, tasks
from tokensparse.eval.harness import encode_sample, run_sample
from tokensparse.testing import tiny_inputs

torch.set_num_threads(1)


@dataclass(eq=False)
class DropSpanAtDecode(Method):
    """A decode-time method that hides keys ``[lo, hi)`` from every single-token query (and is dense
    in a prefill): the smallest method that 'drops the needle' at decode time."""

    name = "test_drop_span_at_decode"
    phase = "decode"
    schedule = "every decode step"

    lo: int = param(0, "int", ge=0)
    hi: int = param(0, "int", ge=0)

    def forward(self, call):
        if call.q_len > 1:
            return call.dense()
        m = call.mask
        m = torch.ones(call.batch, 1, 1, call.k_len, dtype=torch.bool) if m is None else m.clone()
        m[..., self.lo:self.hi] = False
        return dense_attention(call.query, call.key, call.value, m, call.scale)


def _prompt_answer():
    ids, _ = tiny_inputs(1, 40, seed=3)
    return ids[:, :30], ids[:, 30:]


def test_dense_decode_path_equals_one_forward(model):
    prompt, answer = _prompt_answer()
    one = metrics.prefill_answer_loglik(model, prompt, answer)
    dec = scoring.answer_loglik(model, prompt, answer)
    assert dec.loglik == pytest.approx(one, abs=1e-4)
    assert dec.tokens == 10 and dec.logits.shape == (10, model.config.vocab_size)
    assert dec.token_logprobs.shape == (10,) and float(dec.token_logprobs.sum()) == pytest.approx(dec.loglik, abs=1e-5)
    assert metrics.answer_loglik(model, prompt, answer) == pytest.approx(dec.loglik, abs=1e-6)
    # split into context + question, both placements: dense is placement-free
    for placement in ("inside", "after"):
        r = scoring.answer_loglik(model, prompt[:, :24], answer, question_ids=prompt[:, 24:], placement=placement)
        assert r.loglik == pytest.approx(one, abs=1e-4)


def test_a_decode_method_that_drops_the_needle_changes_the_decode_path_score(model):
    prompt, answer = _prompt_answer()
    dense = scoring.answer_loglik(model, prompt, answer)
    drop = DropSpanAtDecode(lo=5, hi=15)
    dec = scoring.answer_loglik(model, prompt, answer, method=drop)
    # the first answer token comes from the (dense) prefill; every later one from a decode step
    # that cannot see keys 5..14
    assert dec.token_logprobs[0] == pytest.approx(float(dense.token_logprobs[0]), abs=1e-5)
    assert (dec.token_logprobs[1:] - dense.token_logprobs[1:]).abs().max() > 1e-3
    # hiding nothing is dense again
    assert scoring.answer_loglik(model, prompt, answer, method=DropSpanAtDecode()).loglik == pytest.approx(
        dense.loglik, abs=1e-4)
    # the one-forward scorer would return dense's number here: it refuses, naming the decode-path one
    with ts.sparsify(model, drop):
        with pytest.raises(ValueError, match="answer_loglik"):
            metrics.prefill_answer_loglik(model, prompt, answer)
        # inside an active session, method=None scores with that session (and its cache)
        assert scoring.answer_loglik(model, prompt, answer).loglik == pytest.approx(dec.loglik, abs=1e-5)


@pytest.mark.parametrize("name", ["token_select", "snapkv", "streaming_llm"])
def test_decode_and_eviction_methods_score_below_budget_differently_and_equal_at_full(model, name):
    prompt, answer = _prompt_answer()
    dense = scoring.answer_loglik(model, prompt, answer).loglik
    cls = ts.methods.get(name)
    sparse = scoring.answer_loglik(model, prompt, answer, method=cls.at_sparse_budget()).loglik
    assert abs(sparse - dense) > 1e-3
    full = scoring.answer_loglik(model, prompt, answer, method=cls.at_full_budget()).loglik
    assert full == pytest.approx(dense, abs=1e-3)
    with ts.sparsify(model, cls.at_sparse_budget()):
        with pytest.raises(ValueError, match="decode path"):
            metrics.prefill_answer_loglik(model, prompt, answer)


def test_prefill_methods_may_use_the_one_forward_scorer(model):
    prompt, answer = _prompt_answer()
    with ts.sparsify(model, ts.methods.get("token_sparse").at_sparse_budget()):
        metrics.prefill_answer_loglik(model, prompt, answer)  # no error: it acts in this prefill


def test_scorer_input_errors(model):
    prompt, answer = _prompt_answer()
    with pytest.raises(ValueError, match="question_ids"):
        scoring.answer_loglik(model, prompt, answer, placement="after")
    with pytest.raises(ValueError, match="placement"):
        scoring.answer_loglik(model, prompt, answer, placement="before")
    with pytest.raises(ValueError, match="at least one token"):
        scoring.answer_loglik(model, prompt, answer[:, :0])
    with pytest.raises(ValueError, match="telemetry needs a method"):
        scoring.answer_loglik(model, prompt, answer, telemetry=ts.Telemetry())


@pytest.mark.parametrize("name,placement", [
    (None, "inside"), ("token_select", "inside"), ("snapkv", "inside"), ("snapkv", "after"),
    ("streaming_llm", "after"), ("token_sparse", "inside"),
])
def test_shared_prefill_score_equals_a_separate_pass(model, tok, name, placement):
    """The runner scores from a copy of the cache and the method's state taken after the timed
    prefill; it must equal a fresh prefill + teacher forcing, also after greedy decoding went on
    (and e.g. TokenSelect's Selection Cache moved on) in the original cache."""
    sample = tasks.make_samples("passkey", tok, 200, depth=0.4)[0]
    method = ts.methods.get(name).at_sparse_budget() if name else None
    if name == "token_select":
        method = ts.methods.get(name)(budget=0.3, n_sink=2, n_local=8, reuse_threshold=0.5)
    target = scoring.answer_target(sample)
    ids = torch.tensor([tok(target, add_special_tokens=False).input_ids])
    r = run_sample(model, tok, sample, method, placement=placement, max_new_tokens=6, teacher_ids=ids)
    alone = scoring.score_sample(model, tok, sample, method, placement)
    assert r.teacher.tokens == alone.tokens == ids.shape[1]
    torch.testing.assert_close(r.teacher.token_logprobs, alone.token_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(r.teacher.logits, alone.logits, atol=1e-4, rtol=0)
    # and the generation itself is unchanged by the copy
    plain = run_sample(model, tok, sample, method, placement=placement, max_new_tokens=6)
    assert plain.prediction == r.prediction
    ctx, q = encode_sample(tok, sample)
    assert r.prompt_tokens == ctx.shape[1] + q.shape[1]


def test_teacher_ids_and_telemetry_are_exclusive(model, tok):
    sample = tasks.make_samples("passkey", tok, 160, depth=0.4)[0]
    with pytest.raises(ValueError, match="telemetry"):
        run_sample(model, tok, sample, ts.methods.get("snapkv").at_sparse_budget(), telemetry=True,
                   teacher_ids=torch.tensor([[5, 6]]))
