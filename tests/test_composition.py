"""Composition: TidalDecode's position reuse driven by another registered method's key scores
(``scorer=``). The selection layer's choice is the top of the scorer's scores (checked against a
brute-force Quest bound from the call's keys), the layers after it reuse that choice, a stored
run key does not change when the new field holds its default, and a full budget equals dense."""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.observers import Observer
from tokensparse.engine.shadow import quantize_rows
from tokensparse.testing import TOLERANCE, max_diff, tiny_inputs, tiny_model

Tidal = ts.methods.get("tidal_decode")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _generate(model, method, ids, mask, observers=(), new=6):
    with torch.no_grad(), ts.sparsify(model, method, observers=list(observers)) as s:
        out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return torch.stack(out.logits, 1), dict(s.stats)


class QuestBruteForce(Observer):
    """Layer 0 selects with Quest's page bound (pages of ``page`` from position 0), one set per KV head
    or, with ``per="layer"``, one set from the KV heads' maximum of the bounds' log-softmax (heads on
    one scale); layer 1 must reuse it."""

    def __init__(self, budget, page=16, per="kv_head", bound="minmax"):
        self.budget, self.page, self.per, self.bound, self.chosen, self.checked = budget, page, per, bound, None, 0

    def on_selection(self, call, selection):
        if call.kind != "decode":
            return
        n = call.k_len
        got = selection.mask(n).expand(call.batch, call.n_kv_heads, n)
        if call.layer_idx == 0:
            q, k = call.query.float(), call.key.float()
            b, hq, _, d = q.shape
            hkv = k.shape[1]
            want = torch.zeros(b, hkv, n, dtype=torch.bool)
            for i in range(b):
                scores = []
                for h in range(hkv):
                    score = []
                    for j in range(n):  # every key; the candidates are all but the current token
                        p = self.page
                        page = k[i, h, j // p * p : j // p * p + p]
                        qs = q[i, h * (hq // hkv) : (h + 1) * (hq // hkv), 0]  # (G, D)
                        if self.bound == "int8":  # the page's maximum of q·k, q and keys int8 (per-row scales)
                            codes, sc = quantize_rows(page)
                            q8, qsc = quantize_rows(qs)
                            bound = ((q8.float() @ codes.float().T) * qsc[:, None] * sc[None, :]).amax()
                        else:  # max over G of Σ_d max_k q_d k_d
                            bound = (qs[:, None, :] * page[None]).amax(1).sum(-1).amax()
                        score.append(float(bound) * call.scale)
                    lse = torch.tensor(score, dtype=torch.float64).logsumexp(0).item()  # heads on one scale
                    scores.append([x - lse for x in score[: n - 1]])
                if self.per == "layer":  # one set for every KV head, from their maximum
                    scores = [[max(col) for col in zip(*scores)]] * hkv
                for h, score in enumerate(scores):
                    order = sorted(range(n - 1), key=lambda j: (-score[j], j))[: self.budget - 1]
                    want[i, h, order] = True
                    want[i, h, n - 1] = True
            assert torch.equal(got, want), "layer 0: not the top of Quest's page bounds"
            self.chosen = want
        else:
            assert torch.equal(got, self.chosen), "layer 1 does not reuse layer 0's positions"
        self.checked += 1


@pytest.mark.parametrize("per", ["kv_head", "layer"])
def test_selection_layer_ranks_by_the_scorer_and_later_layers_reuse(model, per):
    ids, mask = tiny_inputs(2, 40, seed=6)
    obs = QuestBruteForce(budget=10, per=per)
    method = Tidal(budget=10, selection_layers=[0], scorer="quest", select_per=per)
    _, stats = _generate(model, method, ids, mask, observers=[obs])
    assert obs.checked == 2 * 5 and stats["select"] == 5
    with pytest.raises(AssertionError, match="Quest's page bounds"):  # the other sharing chooses otherwise
        other = "layer" if per == "kv_head" else "kv_head"
        _generate(model, Tidal(budget=10, selection_layers=[0], scorer="quest", select_per=other), ids, mask,
                  observers=[QuestBruteForce(budget=10, per=per)])


@pytest.mark.parametrize("per", ["kv_head", "layer"])
def test_scorer_config_reaches_the_scorer(model, per):
    ids, mask = tiny_inputs(2, 40, seed=6)
    obs = QuestBruteForce(budget=10, page=4, per=per)
    method = Tidal(budget=10, selection_layers=[0], scorer="quest", scorer_config={"page": 4}, select_per=per)
    _generate(model, method, ids, mask, observers=[obs])
    assert obs.checked == 2 * 5
    with pytest.raises(AssertionError, match="Quest's page bounds"):  # the default pages of 16 choose otherwise
        _generate(model, Tidal(budget=10, selection_layers=[0], scorer="quest", select_per=per), ids, mask,
                  observers=[QuestBruteForce(budget=10, page=4, per=per)])


def test_scorer_config_bound_reaches_the_scorer(model):
    """Quest with a shadow bound scores as its own selection does (the page's maximum over int8
    keys), not with the min/max bound."""
    ids, mask = tiny_inputs(2, 40, seed=6)
    cfg = {"page": 4, "bound": "int8"}
    for per in ("kv_head", "layer"):
        obs = QuestBruteForce(budget=10, page=4, per=per, bound="int8")
        _generate(model, Tidal(budget=10, selection_layers=[0], scorer="quest", scorer_config=cfg, select_per=per),
                  ids, mask, observers=[obs])
        assert obs.checked == 2 * 5
        with pytest.raises(AssertionError, match="Quest's page bounds"):  # the min/max bound chooses otherwise
            _generate(model, Tidal(budget=10, selection_layers=[0], scorer="quest", scorer_config={"page": 4},
                                   select_per=per), ids, mask, observers=[QuestBruteForce(budget=10, page=4, per=per,
                                                                                        bound="int8")])


@pytest.mark.parametrize("scorer", ["quest", "landmark", "token_select"])
def test_full_budget_composition_equals_dense(model, scorer):
    ids, mask = tiny_inputs(2, 30, pad=5, seed=3)
    dense, _ = _generate(model, Tidal(budget=1.0, selection_layers=[0]), ids, mask)
    logits, _ = _generate(model, Tidal(budget=1.0, selection_layers=[0], scorer=scorer), ids, mask)
    assert max_diff(logits, dense) <= TOLERANCE[torch.float32]


def test_added_field_keeps_stored_run_keys():
    assert "scorer" not in Tidal(budget=0.25).config_dict()
    assert Tidal(budget=0.25, scorer="quest").config_dict()["scorer"] == "quest"
    assert Tidal(budget=0.25, scorer="quest").needs_cache_state and not Tidal(budget=0.25).needs_cache_state
    with pytest.raises(ValueError, match="scorer"):
        Tidal(scorer="h2o")
    assert "scorer_config" not in Tidal(budget=0.25, scorer="landmark").config_dict()
    pinned = Tidal(budget=0.25, scorer="landmark", scorer_config={"block": 32})
    assert pinned.config_dict()["scorer_config"] == {"block": 32} and pinned._scorer().block == 32
    with pytest.raises(ValueError, match="scorer_config must be None without a scorer"):
        Tidal(scorer_config={"block": 32})
    with pytest.raises(TypeError, match="scorer_config must be settings of landmark"):
        Tidal(scorer="landmark", scorer_config={"blocks": 32})
    with pytest.raises(ValueError, match="scorer_config must be settings of landmark"):
        Tidal(scorer="landmark", scorer_config={"block": 0})
