"""SpAtten: every decode call reads exactly the set a brute-force replay of the paper's rules expects
(cumulative importance from dense attention probabilities, per-layer top-k, cascade), a pruned
token is never read again by its layer or a deeper one, head pruning skips exactly the heads of
smallest output magnitude, and a row re-fetches exactly when its low-precision top probability is
below the threshold. Full budgets, padding and beams are covered here and by the shared matrices."""

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import CacheRequiredError
from tokensparse.engine.observers import Observer
from tokensparse.testing import TOLERANCE, max_diff, tiny_inputs, tiny_model

S = ts.methods.get("spatten")
N_LAYERS = 4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=N_LAYERS)


class Capture(Observer):
    """Every call's Q/K/V (and what the method read), and every attention output (``o_proj``'s input)."""

    def __init__(self, model):
        self.calls: list[dict] = []
        self.hooks = []
        for i, layer in enumerate(model.model.layers):
            self.hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(self._out_hook(i)))

    def _out_hook(self, layer_idx):
        def hook(module, args):
            rec = self.calls[-1]
            assert rec["layer"] == layer_idx
            b, lq, _ = args[0].shape
            rec["out"] = args[0].detach().view(b, lq, rec["q"].shape[1], -1).transpose(1, 2).clone()  # (B, Hq, Lq, D)
        return hook

    def on_call(self, call):
        self.calls.append(dict(kind=call.kind, layer=call.layer_idx, q=call.query.detach().float().clone(),
                               k=call.key.detach().float().clone(), v=call.value.detach().float().clone(),
                               valid=None if call.key_valid is None else call.key_valid.clone(), read=None))

    def on_selection(self, call, selection):
        rec = self.calls[-1]
        rec["read"] = None if selection.kind == "dense" else selection.mask(call.k_len)[:, 0].clone()

    def close(self):
        for h in self.hooks:
            h.remove()


def _generate(model, method, ids, mask, new=8, observers=(), **kw):
    with torch.no_grad():
        if method is None:
            out = model.generate(ids, attention_mask=mask, cache=ts.KVCache(model), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, **kw)
            return torch.stack(out.logits, 1), out.sequences, {}
        with ts.sparsify(model, method, observers=list(observers)) as s:
            out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, **kw)
    return torch.stack(out.logits, 1), out.sequences, dict(s.stats)


def _run(model, method, ids, mask, new=8):
    cap = Capture(model)
    try:
        _, _, stats = _generate(model, method, ids, mask, new=new, observers=[cap])
    finally:
        cap.close()
    return cap.calls, stats


# ---- the brute-force replay -----------------------------------------------------------------------


def _resolve(budget, total: int) -> int:
    return max(1, round(budget * total)) if isinstance(budget, float) else int(budget)


def _layer_budget(m, layer: int, n_real: int) -> int:
    first, last = _resolve(m.budget_first, n_real), _resolve(m.budget, n_real)
    span = N_LAYERS - 1 - m.dense_layers
    return last if span <= 0 else first + math.floor((last - first) * (layer - m.dense_layers) / span)


def _low_keys(k: torch.Tensor, quant: str) -> torch.Tensor:
    """Symmetric per-row int8 codes (scale = max|k| / 127); ``int4``: their top 4 bits, mid-bucket."""
    scale = k.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    codes = (k / scale).round().clamp(-127, 127)
    if quant == "int4":
        codes = torch.floor(codes / 16) * 16 + 7.5
    return codes * scale


class Replay:
    """The paper's rules applied by hand, row by row, to the captured Q/K/V of each call."""

    def __init__(self, m):
        self.m = m
        self.imp: dict = {}  # (layer, row) -> float64 (n,) attention received at that layer
        self.alive: dict = {}  # (layer, row) -> set of positions the layer still holds
        self.magnitude: dict = {}  # (layer, row) -> (Hq,) Σ|O_h| of the prefill
        self.skipped: dict = {}  # (layer, row) -> set of skipped heads
        self.refetched = self.quant_rows = 0
        self.checked = 0

    def attend(self, q, k, v, keys, scale, quant=None):
        """Probabilities (Hq, |keys|) and outputs (Hq, D) of one query row over ``keys``."""
        hq, hkv = q.shape[0], k.shape[0]
        kk = k.repeat_interleave(hq // hkv, 0)[:, keys].double()
        vv = v.repeat_interleave(hq // hkv, 0)[:, keys].double()
        if quant is not None:
            kk = _low_keys(k.double(), quant).repeat_interleave(hq // hkv, 0)[:, keys]
        p = torch.softmax(torch.einsum("hd,hnd->hn", q.double(), kk) * scale, -1)
        return p, torch.einsum("hn,hnd->hd", p, vv)

    def run(self, calls):
        m = self.m
        carry_alive: dict = {}
        carry_score: dict = {}
        for c in calls:
            if c["layer"] == 0:  # a new forward pass
                carry_alive, carry_score = {}, {}
            b, hq, lq, d = c["q"].shape
            n = c["k"].shape[2]
            scale = d**-0.5
            if c["layer"] < m.dense_layers:  # plain dense attention: nothing scored, nothing pruned
                continue
            for row in range(b):
                real = list(range(n)) if c["valid"] is None else c["valid"][row].nonzero().flatten().tolist()
                key = (c["layer"], row)
                if c["kind"] == "prefill":
                    self._prefill(c, row, real, key, scale)
                else:
                    assert c["kind"] == "decode"
                    self._decode(c, row, real, key, scale, carry_alive, carry_score)

    def _prefill(self, c, row, real, key, scale):
        n = c["k"].shape[2]
        self.imp[key] = torch.zeros(n, dtype=torch.float64)
        self.alive[key] = set(real)
        w = len(real) if self.m.prompt_window is None else min(self.m.prompt_window, len(real))
        mag = torch.zeros(c["q"].shape[1], dtype=torch.float64)
        for i, p in enumerate(real):
            keys = real[: i + 1]
            probs, out = self.attend(c["q"][row, :, p], c["k"][row], c["v"][row], keys, scale)
            mag += out.abs().sum(-1)
            if i >= len(real) - w:
                self.imp[key][keys] += probs.sum(0)
        self.magnitude[key] = mag

    def _decode(self, c, row, real, key, scale, carry_alive, carry_score):
        m = self.m
        n = c["k"].shape[2]
        hq = c["q"].shape[1]
        imp = self.imp[key] = torch.cat([self.imp[key], torch.zeros(n - len(self.imp[key]), dtype=torch.float64)])
        self.alive[key].add(n - 1)
        read = self.alive[key] & carry_alive[row] if row in carry_alive else set(self.alive[key])
        read = sorted((read | {n - 1}) & set(real))
        got = sorted(range(n)) if c["read"] is None else c["read"][row].nonzero().flatten().tolist()
        if c["read"] is None:  # observed as dense: every real key
            got = real
        assert got == read, f"layer {c['layer']} row {row}: read {got}, expected {read}"
        self.checked += 1
        skipped = set()
        if m.head_prune > 0:
            if key not in self.skipped:
                order = sorted(range(hq), key=lambda h: (float(self.magnitude[key][h]), h))
                self.skipped[key] = set(order[: int(m.head_prune * hq)])
            skipped = self.skipped[key]
        q = c["q"][row, :, 0]
        probs, out = self.attend(q, c["k"][row], c["v"][row], read, scale)
        if m.quant is not None:
            low_p, low_out = self.attend(q, c["k"][row], c["v"][row], read, scale, quant=m.quant)
            flat = low_p.amax(-1) < m.threshold  # (Hq,)
            for h in range(hq):
                if h in skipped:
                    continue
                self.quant_rows += 1
                self.refetched += int(flat[h])
            probs = torch.where(flat[:, None], probs, low_p)
            out = torch.where(flat[:, None], out, low_out)
        c.setdefault("expected_out", {})[row] = (out, skipped)
        for h in range(hq):
            if h not in skipped:
                imp[read] += probs[h]
        score = imp + carry_score.get(row, 0)
        carry_score[row] = score
        if m.pool_kernel > 1:  # max over a window of neighbours, unread tokens counting 0
            base = [float(score[p]) if p in read else 0.0 for p in range(n)]
            lo = m.pool_kernel // 2
            score = [max(base[j] for j in range(p - lo, p - lo + m.pool_kernel) if 0 <= j < n) for p in range(n)]
        n_real = len(real)
        rank = {p: i + 1 for i, p in enumerate(real)}
        local = {p for p in read if rank[p] > n_real - m.n_local}
        cand = sorted((p for p in read if p not in local), key=lambda p: (-float(score[p]), p))
        take = min(max(_layer_budget(m, c["layer"], n_real) - len(local), 0), len(cand))
        keep = local | set(cand[:take])
        self.alive[key] = keep
        carry_alive[row] = keep


CASES = [
    dict(budget=6, budget_first=14, dense_layers=0, n_local=2, prompt_window=4, quant=None, pool_kernel=1),
    dict(budget=0.2, budget_first=0.6, dense_layers=1, n_local=3, prompt_window=None, quant=None, pool_kernel=1),
    dict(budget=5, budget_first=9, dense_layers=1, n_local=1, prompt_window=0, quant="int8", threshold=0.3, pool_kernel=1),
    dict(budget=4, budget_first=12, dense_layers=0, n_local=2, prompt_window=6, quant="int4", threshold=0.5, pool_kernel=1),
    dict(budget=6, budget_first=10, dense_layers=1, n_local=2, prompt_window=8, quant=None, head_prune=0.5, pool_kernel=1),
    dict(budget=5, budget_first=12, dense_layers=0, n_local=1, prompt_window=5, quant=None, pool_kernel=3),
    dict(budget=0.2, budget_first=0.4, dense_layers=2, n_local=2, prompt_window=5, quant="int8", pool_kernel=4),
    # the local window wider than the budget (a layer keeps more than its budget); the first layer
    # keeping everything (its set complete: dense) while the deeper ones prune
    dict(budget=3, budget_first=6, dense_layers=0, n_local=5, prompt_window=4, quant=None, pool_kernel=1),
    dict(budget=0.3, budget_first=1.0, dense_layers=0, n_local=2, prompt_window=4, quant=None, pool_kernel=1),
]


@pytest.mark.parametrize("cfg", CASES)
@pytest.mark.parametrize("batch", [1, 2])
def test_each_step_reads_the_brute_force_cascade_set(model, cfg, batch):
    method = S(**cfg)
    ids, mask = tiny_inputs(batch, 30, pad=5 if batch == 2 else 0, seed=4)
    calls, stats = _run(model, method, ids, mask)
    replay = Replay(method)
    replay.run(calls)
    assert replay.checked == 7 * (N_LAYERS - method.dense_layers) * batch  # 8 new tokens: 7 decode steps
    assert stats["spatten_pruned"] > 0
    if method.quant is not None:  # a row re-fetches exactly when its low-precision top probability is low
        assert stats["spatten_quant_rows"] == replay.quant_rows
        assert stats["spatten_refetch_rows"] == replay.refetched


def _reads(calls):
    """Per decode step: {layer: (B, n) bool} of what each layer read."""
    steps, cur = [], None
    for c in calls:
        if c["kind"] != "decode":
            continue
        if c["layer"] == 0:
            cur = {}
            steps.append(cur)
        n = c["k"].shape[2]
        read = c["read"]
        if read is None:
            read = torch.ones(c["q"].shape[0], n, dtype=torch.bool) if c["valid"] is None else c["valid"]
        cur[c["layer"]] = read
    return steps


@pytest.mark.parametrize("batch", [1, 2])
def test_a_pruned_token_is_never_read_again_by_its_layer_or_a_deeper_one(model, batch):
    method = S(budget=0.15, budget_first=0.6, dense_layers=1, n_local=2, prompt_window=3)
    ids, mask = tiny_inputs(batch, 40, pad=7 if batch == 2 else 0, seed=2)
    calls, stats = _run(model, method, ids, mask, new=14)
    steps = _reads(calls)
    assert stats["spatten_pruned"] > 0
    for t, step in enumerate(steps):
        for layer in range(method.dense_layers + 1, N_LAYERS):  # deeper layers read a subset, this step
            deeper, above = step[layer], step[layer - 1]
            assert not bool((deeper & ~above).any()), f"step {t}: layer {layer} reads a token layer {layer - 1} dropped"
        if t:
            for layer in range(N_LAYERS):  # later steps read a subset (plus the new token)
                now, before = step[layer][:, :-1], steps[t - 1][layer]
                assert not bool((now & ~before).any()), f"step {t}, layer {layer}: a pruned token came back"
    last = steps[-1][N_LAYERS - 1]
    assert int(last[-1].sum()) < last.shape[-1]  # the deepest layer really reads fewer tokens (row -1: unpadded)


@pytest.mark.parametrize("head_output", ["last", "zero"])
def test_head_pruning_skips_exactly_the_lowest_magnitude_heads(model, head_output):
    method = S(budget=1.0, budget_first=1.0, dense_layers=1, quant=None, head_prune=0.5, head_output=head_output)
    ids, mask = tiny_inputs(2, 30, pad=5, seed=6)
    calls, stats = _run(model, method, ids, mask, new=5)
    replay = Replay(method)
    replay.run(calls)
    last = {}  # (layer, row) -> (Hq, D) output of the last prompt token
    for c in calls:
        b = c["q"].shape[0]
        if c["kind"] == "prefill":
            for row in range(b):
                last[(c["layer"], row)] = c["out"][row, :, -1]
            continue
        for row in range(b):
            if c["layer"] < method.dense_layers:  # plain dense
                continue
            want, skipped = c["expected_out"][row]
            assert len(skipped) == 2  # ⌊0.5 · 4⌋ heads
            for h in range(c["q"].shape[1]):
                got = c["out"][row, h, 0]
                if h in skipped:
                    ref = torch.zeros_like(got) if head_output == "zero" else last[(c["layer"], row)][h]
                    assert torch.equal(got, ref), f"layer {c['layer']} row {row} head {h} ran"
                else:
                    assert max_diff(got, want[h]) <= TOLERANCE[torch.float32]
    assert stats["spatten_head_rows_skipped"] == 2 * 2 * (N_LAYERS - 1) * 4  # rows × heads × layers × steps


def test_refetched_rows_output_the_exact_attention_the_others_the_low_precision_one(model):
    method = S(budget=1.0, budget_first=1.0, dense_layers=0, quant="int4", threshold=0.5)
    ids, mask = tiny_inputs(2, 30, pad=5, seed=7)
    calls, stats = _run(model, method, ids, mask, new=5)
    replay = Replay(method)
    replay.run(calls)
    assert 0 < replay.refetched < replay.quant_rows, "pick a threshold that splits the rows"
    assert stats["spatten_refetch_rows"] == replay.refetched
    for c in calls:
        if c["kind"] == "decode":
            for row, (want, _) in c.get("expected_out", {}).items():
                assert max_diff(c["out"][row, :, 0], want) <= TOLERANCE[torch.float32]
    exact = S.at_full_budget()
    dense, _, _ = _generate(model, None, ids, mask, new=5)
    coarse, _, _ = _generate(model, method, ids, mask, new=5)
    assert max_diff(coarse, dense) > 1e-3  # 4-bit scores change the output
    full, _, full_stats = _generate(model, exact, ids, mask, new=5)
    assert max_diff(full, dense) <= TOLERANCE[torch.float32] and "spatten_refetch_rows" not in full_stats


def test_threshold_one_refetches_every_row_and_equals_exact_scores(model):
    ids, mask = tiny_inputs(1, 30, seed=8)
    exact, _, _ = _generate(model, S(budget=5, budget_first=10, dense_layers=0, n_local=2, quant=None), ids, mask)
    logits, _, stats = _generate(model, S(budget=5, budget_first=10, dense_layers=0, n_local=2, quant="int4",
                                          threshold=1.0), ids, mask)
    assert stats["spatten_refetch_rows"] == stats["spatten_quant_rows"] > 0
    assert max_diff(logits, exact) <= TOLERANCE[torch.float32]


def test_beam_search_and_a_new_cache(model):
    ids, mask = tiny_inputs(1, 24, seed=5)
    method = S(budget=4, budget_first=10, dense_layers=0, n_local=2, head_prune=0.25)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=5, num_beams=2,
                             do_sample=False, pad_token_id=0)
        assert out.shape == (1, 29) and s.stats["spatten_pruned"] > 0
    # a second prompt on a new cache starts from a full set
    rec = Capture(model)
    try:
        with torch.no_grad(), ts.sparsify(model, method, observers=[rec]) as s:
            model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=2, do_sample=False,
                           pad_token_id=0)
    finally:
        rec.close()
    first = next(c for c in rec.calls if c["kind"] == "decode")
    assert first["read"] is None  # the first decode step's first layer reads everything


def test_default_dense_layers_read_everything_and_only_score(model):
    ids, mask = tiny_inputs(1, 40, seed=3)
    calls, stats = _run(model, S(dense_layers=N_LAYERS), ids, mask)
    assert all(c["read"] is None for c in calls if c["kind"] == "decode")
    assert "spatten_pruned" not in stats


def test_bad_configs_are_refused_and_a_stock_cache_names_the_fix(model):
    with pytest.raises(ValueError, match="budget_first"):
        S(budget=0.5, budget_first=0.2)
    with pytest.raises(ValueError):
        S(n_local=0)
    with pytest.raises(ValueError):
        S(quant="int2")
    ids, mask = tiny_inputs(1, 20, seed=1)
    with torch.no_grad(), ts.sparsify(model, S(dense_layers=0)):
        with pytest.raises(CacheRequiredError):
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("cfg", CASES, ids=range(len(CASES)))
def test_host_bounds_hold_each_layers_kept_set(model, cfg):
    """Each pruning layer's host bound (``AliveRows.bound``, which sizes decode steps without reading
    the device) is at least the real tokens its set keeps, and equals the real tokens exactly when
    its set holds all of them (the step then runs dense), after every decode step of a padded
    batch; budgets down to one token below the set make the "exactly" part bite."""
    from tokensparse.methods.spatten import _ALIVE

    method = S(**cfg)
    ids, mask = tiny_inputs(2, 30, pad=5, seed=4)
    checked = 0
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        out = model(ids, attention_mask=mask, cache=cache)
        for _ in range(7):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(tok, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, cache=cache)
            for i in range(method.dense_layers, N_LAYERS):
                st = cache.layers[i].states[_ALIVE]
                held = (st.values[:, 0] & mask.bool()).sum(-1).tolist()
                real = mask.sum(-1).tolist()
                assert st.bound is not None
                for b, h, r in zip(st.bound, held, real):
                    assert b >= h and (b == r) == (h == r), (i, st.bound, held, real)
                    checked += 1
    assert checked == 7 * 2 * (N_LAYERS - method.dense_layers)


def test_host_bounds_survive_beam_reordering(model):
    """Beam search reorders and repeats the cache's rows: each pruning layer's host bound still
    holds its kept set afterwards (exact iff complete), and the beams decode as without bounds
    (the same sequences as when every step reads its sizes from the device)."""
    from tokensparse.methods.spatten import _ALIVE, AliveRows

    method = S(budget=4, budget_first=10, dense_layers=0, n_local=2, prompt_window=4)
    ids, mask = tiny_inputs(1, 24, seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad(), ts.sparsify(model, method) as s:
        cache = s.new_cache()
        out = model.generate(ids, cache=cache, **kw)
        real = out.shape[1] - 1  # the last token is not written yet
        for i in range(N_LAYERS):
            st = cache.layers[i].states[_ALIVE]
            held = st.values[:, 0].sum(-1).tolist()
            assert st.bound is not None and len(st.bound) == len(held)
            for b, h in zip(st.bound, held):
                assert b >= h and (b == real) == (h == real), (i, st.bound, held)
    # the device-sized path: no host bound is ever set (the prompt leaves it unknown, every step reads)
    original = AliveRows.on_write
    try:
        AliveRows.on_write = lambda self, layer, start, end: (original(self, layer, start, end),
                                                              setattr(self, "bound", None))
        with torch.no_grad(), ts.sparsify(model, method) as s:
            again = model.generate(ids, cache=s.new_cache(), **kw)
    finally:
        AliveRows.on_write = original
    assert torch.equal(out, again)
