"""FASA: the agreement profile equals a brute-force count on a tiny model, the cache's copy of
the chosen key dimensions follows writes, the keys a decode step attends are the brute-force top
keys by the frequency-chunk scores (both dimension pairings; max-pooled over neighbours, also in a
left-padded batch; re-ranked exactly), and profiles load or are refused."""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import PreallocLayer
from tokensparse.engine.calibration import calibrate
from tokensparse.engine.observers import Observer
from tokensparse.methods.fasa import KeyDims, fc_dims, measure_agreement
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FASA = ts.methods.get("fasa")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_fc_dims_layouts():
    c = torch.tensor([[0, 3]])
    assert fc_dims(c, 8, "rotate_half").tolist() == [[0, 3, 4, 7]]
    assert fc_dims(c, 8, "adjacent").tolist() == [[0, 1, 6, 7]]


def test_agreement_against_brute_force(model):
    ids, _ = tiny_inputs(1, 40, seed=1)
    payload = measure_agreement(model, ids, queries=4)
    captured = {}

    class Grab(Observer):
        def on_call(self, call):
            captured[call.layer_idx] = (call.query[0].float(), call.key[0].float().repeat_interleave(call.group, 0))

    with torch.no_grad(), ts.observe(model, Grab()):
        model(ids, use_cache=False)
    q, k = captured[1]
    d = q.shape[-1]
    for bi, budget in enumerate(payload["budgets"]):
        kk = min(budget, 40 - 4)
        for layout in ("rotate_half", "adjacent"):
            got = torch.tensor(payload["agreement"][layout][bi][1])  # (Hq, D/2)
            for h in (0, q.shape[0] - 1):
                for c in range(d // 2):
                    dims = fc_dims(torch.tensor([c]), d, layout)
                    total = 0.0
                    for qi in range(36, 40):
                        full = q[h, qi] @ k[h, : qi + 1].T
                        part = q[h, qi, dims] @ k[h, : qi + 1][:, dims].T
                        a = set(full.topk(kk).indices.tolist())
                        b = set(part.topk(kk).indices.tolist())
                        total += len(a & b) / kk
                    assert got[h, c] == pytest.approx(total / 4, abs=1e-4), (layout, budget, h, c)


def test_key_dims_follow_writes():
    dims = torch.tensor([[0, 5], [2, 3]])
    layer = PreallocLayer(headroom=2)
    g = torch.Generator().manual_seed(0)
    layer.update(torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g))
    st = layer.state("d", lambda: KeyDims(dims))
    for _ in range(4):
        layer.update(torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g))
    want = torch.stack([layer.keys[:, h][..., dims[h]] for h in range(2)], 1)
    assert torch.equal(st.values, want)
    layer.crop(-2)
    layer.reorder_cache(torch.tensor([1, 0]))
    want = torch.stack([layer.keys[:, h][..., dims[h]] for h in range(2)], 1)
    assert torch.equal(st.values, want)


class BruteForceTop(Observer):
    def __init__(self, m, dims):
        self.m, self.dims, self.checked = m, dims, 0

    def on_selection(self, call, selection):
        if call.kind != "decode" or selection.kind == "dense":
            return
        q, k = call.query.float()[:, :, 0], call.key.float()
        b, hq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        g = hq // hkv
        want = torch.zeros(b, hkv, n, dtype=torch.bool)
        for i in range(b):
            for h in range(hkv):
                dims = self.dims[h]
                logits = torch.stack([q[i, h * g + j, dims] @ k[i, h][:, dims].T * call.scale for j in range(g)])
                if self.m.head_scale == "zscore":  # each head over its real keys: (l - mean) / std
                    on = torch.ones(n, dtype=torch.bool) if call.key_valid is None else call.key_valid[i]
                    mean = logits[:, on].mean(-1, keepdim=True)
                    sd = (logits[:, on] - mean).square().mean(-1, keepdim=True).sqrt()
                    logits = (logits - mean) / sd
                if call.key_valid is not None:
                    logits = logits.masked_fill(~call.key_valid[i], float("-inf"))
                p = logits if self.m.head_scale == "zscore" else logits.softmax(-1)
                w = {"max": lambda: p.amax(0), "mean": lambda: p.mean(0), "sum": lambda: p.sum(0)}[self.m.gqa_reduce]()
                real = [j for j in range(n - 1) if call.key_valid is None or bool(call.key_valid[i, j])]
                r = self.m.pool_kernel // 2  # max over the real candidates within r positions
                w = {j: max(float(w[c]) for c in real if abs(c - j) <= r) for j in real}
                budget = self.m.budget if isinstance(self.m.budget, int) else round((len(real) + 1) * self.m.budget)
                order = sorted(real, key=lambda j: (-w[j], j))[: self.m.rerank * (budget - 1)]
                if self.m.head_top:  # each query head's own best first (their union), then by w
                    c = min(budget - 1, len(real))
                    own = min(int(self.m.head_top * c), c // g)
                    union = set()
                    for j in range(g):
                        union |= set(sorted(real, key=lambda x: (-float(logits[j, x]), x))[:own])
                    order = sorted(union) + [x for x in order if x not in union]
                if self.m.rerank > 1:  # the exact q·k over the partial top, softmax per query head
                    full = torch.stack([q[i, h * g + j] @ k[i, h][order].T * call.scale for j in range(g)])
                    exact = dict(zip(order, full.softmax(-1).amax(0).tolist()))
                    order = sorted(order, key=lambda j: (-exact[j], j))
                order = order[: budget - 1]
                want[i, h, order + [n - 1]] = True
        assert torch.equal(selection.mask(n).expand_as(want), want), f"layer {call.layer_idx}"
        self.checked += 1


@pytest.mark.parametrize("layout,pool,pad,rerank,budget", [("rotate_half", 1, 0, 1, 9), ("adjacent", 1, 0, 1, 9),
                                                           ("rotate_half", 5, 0, 1, 9), ("rotate_half", 5, 6, 1, 9),
                                                           ("rotate_half", 1, 0, 2, 9), ("adjacent", 1, 6, 2, 9),
                                                           ("rotate_half", 1, 6, 2, 0.3)])
def test_attended_keys_are_the_brute_force_top(model, layout, pool, pad, rerank, budget):
    _check_brute_force_top(model, FASA(budget=budget, chunks=2, layout=layout, fcs="low", dense_layers=0,
                                       pool_kernel=pool, rerank=rerank), layout, pad, budget, rerank)


@pytest.mark.parametrize("head_top,pool,pad,budget", [(1 / 3, 1, 0, 9), (0.2, 1, 0, 9), (1.0, 5, 0, 9),
                                                      (0.34, 1, 6, 0.3), (1 / 3, 5, 6, 9)])
def test_head_tops_are_the_brute_force_union(model, head_top, pool, pad, budget):
    """``head_top``: each query head's own best keys by its partial logits first, the rest of the
    budget by the group-combined softmax (unpadded and left-padded, a token or a share budget)."""
    m = FASA(budget=budget, chunks=2, fcs="low", dense_layers=0, pool_kernel=pool, head_top=head_top)
    _check_brute_force_top(model, m, "rotate_half", pad, budget, 1)


def test_head_top_refuses_rerank():
    with pytest.raises(ValueError, match="head_top and rerank"):
        FASA(head_top=0.3, rerank=2)


@pytest.mark.parametrize("reduce,pool,pad,budget,rerank", [("max", 1, 0, 9, 1), ("max", 1, 6, 0.3, 1), ("mean", 5, 6, 9, 1),
                                                            ("max", 1, 6, 9, 2)])
def test_zscored_heads_are_the_brute_force_top(model, reduce, pool, pad, budget, rerank):
    """``head_scale="zscore"``: each head's partial logits standardised over its real keys, then
    combined by ``gqa_reduce`` (unpadded and left-padded; a re-rank still combines softmaxes)."""
    m = FASA(budget=budget, chunks=2, fcs="low", dense_layers=0, pool_kernel=pool, gqa_reduce=reduce,
             head_scale="zscore", rerank=rerank)
    _check_brute_force_top(model, m, "rotate_half", pad, budget, rerank)


def _check_brute_force_top(model, m, layout, pad, budget, rerank):
    d = model.config.hidden_size // model.config.num_attention_heads
    fc = fc_dims(torch.arange(d // 2)[:, None], d, layout)
    idx = (fc % (d // 2)).double().mean(-1)
    low = idx.argsort(descending=True, stable=True)[:2]
    dims = fc_dims(low.sort().values, d, layout).expand(model.config.num_key_value_heads, -1)
    ids, mask = tiny_inputs(2, 30, pad=pad, seed=2)  # padding never spreads into the pooled scores
    obs = BruteForceTop(m, dims)
    with torch.no_grad(), ts.sparsify(model, m, observers=[obs]) as s:
        model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False, pad_token_id=0)
        assert s.stats["fasa_scored_dims"] * d == s.stats["fasa_key_dims"] * 4  # 2 FCs = 4 of D dims
        if budget == 9:
            assert s.stats["fasa_rescored_dims"] == (2 * 4 * 16 * d if rerank > 1 else 0)  # 2·8 candidates per step
    assert obs.checked == 2 * 4


def test_profile_round_trip_and_missing_profile(model, tmp_path):
    ids, mask = tiny_inputs(1, 40, seed=1)
    prof = calibrate(model, FASA, ids, source="random ids")
    path = prof.save(tmp_path / "fasa.json")
    m = FASA(budget=8, chunks=2, profile=str(path))
    with torch.no_grad(), ts.sparsify(model, m) as s:
        model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert s.info["fasa_profile"] == str(path)
        assert s.stats["sparse_calls"] > 0
    with pytest.warns(UserWarning, match="calibrate --method fasa"):
        with ts.sparsify(model, FASA(budget=8)) as s:
            assert s.info["fasa_fcs"] == "low"
    with pytest.raises(ValueError, match="chunks"):
        with ts.sparsify(model, FASA(budget=8, chunks=99, fcs="low")):
            pass
