"""The prompt step (Engine v2 part 2) and its proof method FrugalPrompt: salience against the
attention matrix of an eager forward, the kept positions (count, order, sinks, the most salient),
keep = 1 equals dense through the harness, the harness applies the step and reports it, errors."""

import math
from dataclasses import dataclass

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import Method, Phase
from tokensparse.engine.prompt import apply_prompt_step
from tokensparse.eval import scoring, tasks
from tokensparse.eval.harness import encode_sample, run_sample
from tokensparse.testing import tiny_inputs, tiny_model

from eval_fakes import model, tok  # noqa: F401 (pytest fixtures shared by the eval tests)

pytestmark = pytest.mark.usefixtures("one_thread")
FrugalPrompt = ts.methods.get("frugal_prompt")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", torch.float32)


def _eager_salience(model, ids, layers):
    """Sink score from the eager attention matrices: Σ_t A[t, i] / (T − i), head mean, layer mean."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(ids, output_attentions=True).attentions  # per layer (1, H, T, T)
    finally:
        model.set_attn_implementation("sdpa")
    t = ids.shape[1]
    seen = torch.arange(t, 0, -1).float()
    return torch.stack([att[l][0].sum(-2).mean(0) / seen for l in layers]).mean(0)


def test_salience_equals_the_attention_matrix(llama):
    ids, _ = tiny_inputs(1, 30, seed=5)
    for layers, which in (("second_half", [1]), ("all", [0, 1]), ([0], [0])):
        got = FrugalPrompt(layers=layers).salience(llama, ids)
        torch.testing.assert_close(got, _eager_salience(llama, ids, which), atol=1e-5, rtol=1e-4)


def test_kept_positions_are_the_most_salient_in_order(llama):
    ids, _ = tiny_inputs(1, 30, seed=6)
    m = FrugalPrompt(keep=0.4, n_sink=2)
    pos = m.compress_prompt(llama, ids)
    assert pos.tolist() == sorted(pos.tolist()) and len(pos) == math.ceil(0.4 * 30)
    assert pos[:2].tolist() == [0, 1]
    score = m.salience(llama, ids)
    rest = set(range(2, 30)) - set(pos.tolist())
    assert float(score[pos[2:]].min()) >= float(score[list(rest)].max())
    out, step = apply_prompt_step(llama, m, ids)
    assert torch.equal(out, ids[:, pos]) and (step.context_tokens, step.kept_tokens) == (30, 12)
    assert step.seconds >= 0 and set(step.as_stats()) == {"prompt_context_tokens", "prompt_kept_tokens", "prompt_step_s"}
    assert FrugalPrompt(keep=1.0).compress_prompt(llama, ids).tolist() == list(range(30))


def test_inside_sparsify_a_prompt_method_changes_nothing(llama):
    ids, mask = tiny_inputs(2, 20, pad=3)
    with torch.no_grad():
        ref = llama(ids, attention_mask=mask).logits
        with ts.sparsify(llama, FrugalPrompt(keep=0.5)) as s:
            out = llama(ids, attention_mask=mask).logits
    assert torch.equal(out, ref) and s.stats.get("sparse_calls", 0) == 0


def test_the_harness_applies_the_step(model, tok):
    sample = tasks.make_samples("passkey", tok, 200, depth=0.4)[0]
    ctx, q = encode_sample(tok, sample)
    dense = run_sample(model, tok, sample, None, max_new_tokens=6)
    full = run_sample(model, tok, sample, FrugalPrompt(keep=1.0), max_new_tokens=6)
    assert full.prediction == dense.prediction and full.prompt_tokens == dense.prompt_tokens
    assert full.stats["prompt_kept_tokens"] == full.stats["prompt_context_tokens"] == ctx.shape[1]
    half = run_sample(model, tok, sample, FrugalPrompt(keep=0.5), max_new_tokens=6)
    assert half.prompt_tokens == math.ceil(0.5 * ctx.shape[1]) + q.shape[1]
    assert half.stats["prompt_kept_tokens"] == math.ceil(0.5 * ctx.shape[1])
    # the decode-path score sees the same compressed prompt; at keep = 1 it is dense's
    a = scoring.score_sample(model, tok, sample, FrugalPrompt(keep=1.0))
    b = scoring.score_sample(model, tok, sample, None)
    assert abs(a.loglik - b.loglik) < 1e-4
    c = scoring.score_sample(model, tok, sample, FrugalPrompt(keep=0.5))
    assert abs(c.loglik - b.loglik) > 1e-4


@dataclass(eq=False)
class _Bad(Method):
    name = "bad_prompt"
    phase = Phase.PROMPT
    positions: tuple = ()

    def compress_prompt(self, model, context_ids):
        return torch.tensor(self.positions, dtype=torch.long)


def test_prompt_step_errors(llama):
    ids, _ = tiny_inputs(1, 10)
    with pytest.raises(ValueError, match="not a prompt-step method"):
        apply_prompt_step(llama, ts.methods.get("snapkv")(), ids)
    with pytest.raises(ValueError, match="one prompt"):
        apply_prompt_step(llama, FrugalPrompt(), torch.cat([ids, ids]))
    for bad in ((), (3, 2), (1, 1), (-1, 2), (4, 10)):
        with pytest.raises(ValueError, match="kept no context token|sorted, unique"):
            apply_prompt_step(llama, _Bad(positions=bad), ids)
    with pytest.raises(ValueError, match="out of range"):
        FrugalPrompt(layers=[5]).compress_prompt(llama, ids)
    with pytest.raises(NotImplementedError):
        ts.methods.get("snapkv")().compress_prompt(llama, ids)
    for bad in ({"keep": 0}, {"keep": 1.5}, {"n_sink": -1}, {"layers": "first_half"}):
        with pytest.raises((ValueError, TypeError)):
            FrugalPrompt(**bad)
