"""Landmark-style block retrieval: the cache-kept representatives (mean / max-norm key per block)
equal a computation from the full keys after prefill, decode, crop and beam reordering; the blocks a
decode step attends are the brute-force top blocks by attention to the representatives."""

import math

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import PreallocLayer
from tokensparse.engine.cache import PageSummary, page_max_norm_keys, page_means
from tokensparse.engine.observers import Observer
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
Landmark = ts.methods.get("landmark")


def test_representatives_brute_force():
    k = torch.randn(2, 3, 11, 4)
    (mean,) = page_means(k, 4)
    (top,) = page_max_norm_keys(k, 4)
    assert mean.shape == top.shape == (2, 3, 3, 4)
    for p, (s, e) in enumerate([(0, 4), (4, 8), (8, 11)]):
        assert torch.allclose(mean[:, :, p], k[:, :, s:e].mean(2))
        for b in range(2):
            for h in range(3):
                j = int(k[b, h, s:e].norm(dim=-1).argmax())
                assert torch.equal(top[b, h, p], k[b, h, s + j])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kind", ["mean", "max_norm"])
@pytest.mark.parametrize("page", [1, 3])
def test_representatives_follow_prefill_decode_crop_and_beams(kind, page, dtype):
    """Also kept in bfloat16 (token-major buffer): the fp32 summary rounded once, exactly."""
    fn = {"mean": page_means, "max_norm": page_max_norm_keys}[kind]
    g = torch.Generator().manual_seed(0)

    def kv(t):
        return torch.randn(2, 2, t, 8, generator=g), torch.randn(2, 2, t, 8, generator=g)

    def agrees(layer, st):
        want = fn(layer.keys, page)[0]
        if dtype is None:
            return torch.allclose(st.summaries[0], want)
        got = st.summaries[0]
        return got.dtype == dtype and got.transpose(1, 2)[0].is_contiguous() and torch.equal(got, want.to(dtype))

    layer = PreallocLayer(headroom=2)  # small headroom: the decode steps below grow the buffers
    layer.update(*kv(7))
    st = layer.state("r", lambda: PageSummary(page, kind, dtype))
    assert agrees(layer, st)
    for _ in range(5):
        layer.update(*kv(1))
        assert agrees(layer, st)
    layer.crop(-4)
    assert agrees(layer, st)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert agrees(layer, st)
    copy = layer.clone()
    copy.batch_repeat_interleave(2)
    assert agrees(copy, copy.states["r"])
    with pytest.raises(ValueError, match="kind"):
        PageSummary(4, "median")
    with pytest.raises(ValueError, match="floating"):
        PageSummary(4, "mean", torch.int8)
    with pytest.raises(ValueError, match="minmax"):
        st.bounds


class BruteForceBlocks(Observer):
    """The blocks of a one-level step from the full keys (loops). With ``summary_dtype``: the block
    means and the scaled query rounded to it, each logit their exact dot product rounded to it."""

    def __init__(self, m):
        self.m, self.checked = m, 0

    def on_selection(self, call, selection):
        if call.kind != "decode" or selection.kind == "dense":
            return
        assert call.key_valid is None
        q, k = call.query.float(), call.key.float()
        b, hq, _, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        blk = self.m.block
        n_all = -(-n // blk)
        reps = torch.stack([k[:, :, i * blk : (i + 1) * blk].mean(2) for i in range(n_all - 1)], 2)
        if self.m.summary_dtype is None:
            logits = torch.einsum("bhd,bhpd->bhp", q[:, :, 0], reps.repeat_interleave(hq // hkv, 1)) * call.scale
        else:
            low = getattr(torch, self.m.summary_dtype)
            ql, rl = (q[:, :, 0] * call.scale).to(low).double(), reps.to(low).double()
            logits = torch.einsum("bhd,bhpd->bhp", ql, rl.repeat_interleave(hq // hkv, 1)).to(low).float()
        w = logits.softmax(-1).view(b, hkv, hq // hkv, -1).amax(2)
        n_sel = self.m.n_blocks(n) - 1
        want = torch.zeros(b, hkv, n, dtype=torch.bool)
        want[:, :, (n_all - 1) * blk :] = True
        for i in range(b):
            for h in range(hkv):
                for p in sorted(range(n_all - 1), key=lambda p: (-float(w[i, h, p]), p))[:n_sel]:
                    want[i, h, p * blk : (p + 1) * blk] = True
        assert torch.equal(selection.mask(n).expand_as(want), want), f"layer {call.layer_idx}"
        self.checked += 1


@pytest.mark.parametrize("summary_dtype", [None, "bfloat16", "float16"])
def test_attended_blocks_are_the_brute_force_top_blocks(summary_dtype):
    model = tiny_model("llama")
    method = Landmark(budget=12, block=4, summary_dtype=summary_dtype)
    ids, mask = tiny_inputs(2, 33, seed=2)
    obs = BruteForceBlocks(method)
    with torch.no_grad(), ts.sparsify(model, method, observers=[obs]) as s:
        model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=6, min_new_tokens=6,
                       do_sample=False, pad_token_id=0)
        assert s.stats["landmark_summary_rows"] < s.stats["landmark_cache_rows"]
    assert obs.checked == 2 * 5


class BruteForceTwoLevel(Observer):
    """The blocks of a two-level step: top coarse blocks by softmax over the coarse means, then the
    top fine blocks by softmax over the candidates' means (loops, from the full keys)."""

    def __init__(self, m):
        self.m, self.checked, self.narrowed = m, 0, 0

    def on_selection(self, call, selection):
        if call.kind != "decode" or selection.kind == "dense":
            return
        q, k = call.query.float(), call.key.float()
        b, hq, _, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        g, blk, ratio = hq // hkv, self.m.block, self.m.coarse
        n_full = -(-n // blk) - 1
        n_sel = self.m.n_blocks(n) - 1
        n_big = n_full // ratio  # coarse blocks of full blocks
        m = -(-int(math.ceil(self.m.widen * n_sel)) // ratio)

        def weights(i, h, reps):  # max over the group of each query head's softmax over reps
            logits = q[i, h * g : (h + 1) * g, 0] @ torch.stack(reps).T * call.scale
            return logits.softmax(-1).amax(0)

        def top(w, cands, count):
            return sorted(sorted(range(len(cands)), key=lambda j: (-float(w[j]), j))[:count])

        want = torch.zeros(b, hkv, n, dtype=torch.bool)
        want[:, :, n_full * blk :] = True
        for i in range(b):
            for h in range(hkv):
                if m >= n_big:
                    cands = list(range(n_full))
                else:
                    coarse = [k[i, h, c * ratio * blk : (c + 1) * ratio * blk].mean(0) for c in range(n_big)]
                    picked = top(weights(i, h, coarse), coarse, m)
                    cands = [c * ratio + j for c in picked for j in range(ratio)] + list(range(n_big * ratio, n_full))
                    self.narrowed += 1
                w = weights(i, h, [k[i, h, p * blk : (p + 1) * blk].mean(0) for p in cands])
                for j in top(w, cands, n_sel):
                    want[i, h, cands[j] * blk : (cands[j] + 1) * blk] = True
        assert torch.equal(selection.mask(n).expand_as(want), want), f"layer {call.layer_idx}"
        self.checked += 1


@pytest.mark.parametrize("widen", [1.0, 2.5])
def test_two_level_blocks_are_the_brute_force_choice(widen):
    model = tiny_model("llama")
    method = Landmark(budget=8, block=2, coarse=3, widen=widen)
    ids, _ = tiny_inputs(2, 41, seed=3)
    obs = BruteForceTwoLevel(method)
    with torch.no_grad(), ts.sparsify(model, method, observers=[obs]) as s:
        model.generate(ids, cache=s.new_cache(), max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert obs.checked == 2 * 4 and obs.narrowed > 0
    # coarse rows plus candidates: fewer summary rows than one level's L / block
    assert s.stats["landmark_summary_rows"] < s.stats["landmark_cache_rows"] / 2


def test_two_level_covering_the_context_is_one_level():
    """Candidates that hold every block: the same steps, logits and tokens as the one-level search."""
    model = tiny_model("llama")
    ids, mask = tiny_inputs(2, 37, seed=4)
    outs = []
    for method in (Landmark(budget=8, block=2), Landmark(budget=8, block=2, coarse=2, widen=8.0)):
        with torch.no_grad(), ts.sparsify(model, method) as s:
            out = model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        outs.append(out)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        assert torch.equal(a, b)


def test_low_precision_logits_agree_across_layouts():
    """The block-diagonal product on token-major summaries and the per-head product on other
    layouts give the same bf16 logits (both: one dot product of D terms per logit)."""
    g = torch.Generator().manual_seed(5)
    qg = torch.randn(2, 3, 3, 16, generator=g).bfloat16()
    token_major = torch.randn(2, 40, 3, 16, generator=g).bfloat16()
    fast = Landmark.low_precision_logits(qg, token_major[:, :37].transpose(1, 2))
    plain = Landmark.low_precision_logits(qg, token_major[:, :37].transpose(1, 2).contiguous())
    assert fast.shape == (2, 3, 3, 37) and fast.dtype == torch.float32 and fast.is_contiguous()
    assert torch.equal(fast, plain)
    exact = (qg.double() @ token_major[:, :37].transpose(1, 2).double().transpose(-1, -2)).to(torch.bfloat16).float()
    assert (fast - exact).abs().max() <= 2 ** -7 * exact.abs().max()  # at most a bf16 rounding apart
    # block_weights scores with them: the query scaled, then rounded; not the fp32 logits
    q = torch.randn(2, 9, 1, 16, generator=g)
    reps = token_major[:, :37].transpose(1, 2)
    got = Landmark(summary_dtype="bfloat16").block_weights(q, reps, 0.25)
    ql = (q.view(2, 3, 3, 16) * 0.25).bfloat16().double()
    want = (ql @ reps.double().transpose(-1, -2)).to(torch.bfloat16).float().softmax(-1).amax(2)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert not torch.allclose(got, Landmark().block_weights(q, reps, 0.25), rtol=1e-3, atol=0)


def test_summary_dtype_option():
    assert "summary_dtype" not in Landmark().config_dict()
    assert Landmark(summary_dtype="bfloat16").config_dict()["summary_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="summary_dtype"):
        Landmark(summary_dtype="int8")


def test_two_level_options_are_checked():
    with pytest.raises(ValueError, match="coarse"):
        Landmark(coarse=1)
    with pytest.raises(ValueError, match="widen"):
        Landmark(widen=2.0)
    with pytest.raises(ValueError, match="widen"):
        Landmark(coarse=8, widen=0.5)
