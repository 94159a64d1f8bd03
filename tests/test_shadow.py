"""The low-precision key shadow: follows the cache's writes, int8 scores equal the dequantised
reference exactly (integer products), Quest's exact-page score over the shadow picks the brute-force
top pages, and the stored run keys of configurations without the new fields do not change."""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine import PreallocLayer
from tokensparse.engine.observers import Observer
from tokensparse.engine.shadow import ShadowKeys, int8_products, quantize_rows, shadow_logits
from tokensparse.testing import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
Quest = ts.methods.get("quest")


def _layer_with_shadow(kind):
    g = torch.Generator().manual_seed(0)
    layer = PreallocLayer(headroom=2)
    layer.update(torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g))
    st = layer.state("s", lambda: ShadowKeys(kind))
    for _ in range(5):
        layer.update(torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g))
    return layer, st


def test_int8_shadow_follows_writes_and_scores_exactly():
    layer, st = _layer_with_shadow("int8")
    q8, scale = quantize_rows(layer.keys)
    assert st.n == 35 and torch.equal(st.keys[:, :, :35], q8) and torch.equal(st.scale[:, :, :35], scale)
    assert (scale[..., None] * q8.float() - layer.keys).abs().max() <= scale.max() / 2 + 1e-6  # half a step
    q = torch.randn(2, 2, 3, 8)
    qq, qs = quantize_rows(q)
    ref = (qq.float() @ q8.float().transpose(-1, -2)) * qs[..., None] * scale[:, :, None, :]
    assert torch.allclose(shadow_logits(q, st), ref, rtol=1e-6, atol=1e-6)
    layer.crop(-3)
    layer.reorder_cache(torch.tensor([1, 0]))
    assert st.n == 32 and torch.equal(st.keys[:, :, :32], quantize_rows(layer.keys)[0])


def test_int8_products_batched_path_equals_int_mm_exactly(monkeypatch):
    """The batched fp32 product (devices other than a CPU, CPUs without AVX-512, and shapes
    ``torch._int_mm`` refuses) gives the very integers of the CPU kernel: queries are quantised per
    row, so 17 rows (batched path) equal 16 + 1 rows (``_int_mm`` path, forced on) bit for bit."""
    from tokensparse.engine import shadow

    monkeypatch.setattr(shadow, "CPU_INT_MM", True)
    g = torch.Generator().manual_seed(1)
    k8, ks = quantize_rows(torch.randn(2, 3, 40, 64, generator=g) * 3)
    q = torch.randn(2, 3, 17, 64, generator=g)
    batched = int8_products(q, k8, ks)
    split = torch.cat([int8_products(q[:, :, :16], k8, ks), int8_products(q[:, :, 16:], k8, ks)], dim=2)
    assert torch.equal(batched, split)
    qq, qs = quantize_rows(q)
    ints = torch.einsum("bhmd,bhnd->bhmn", qq.double(), k8.double())
    assert torch.equal(batched, (ints.float() * qs[..., None] * ks[:, :, None, :]))
    monkeypatch.setattr(shadow, "CPU_INT_MM", False)  # an AVX2 CPU: the batched product for 16 rows too
    assert torch.equal(torch.cat([int8_products(q[:, :, :16], k8, ks), int8_products(q[:, :, 16:], k8, ks)], dim=2),
                       split)
    with pytest.raises(ValueError, match="head_dim"):
        int8_products(torch.randn(1, 1, 1, 2048), *quantize_rows(torch.randn(1, 1, 20, 2048)))


def test_bf16_shadow_scores_close_to_fp32():
    layer, st = _layer_with_shadow("bf16")
    q = torch.randn(2, 2, 3, 8)
    exact = q @ layer.keys.transpose(-1, -2)
    assert (shadow_logits(q, st) - exact).abs().max() < 0.1
    with pytest.raises(ValueError, match="shadow kind"):
        ShadowKeys("fp8")


class PageMaxBruteForce(Observer):
    def __init__(self, m):
        self.m, self.checked = m, 0

    def on_selection(self, call, selection):
        if call.kind != "decode" or selection.kind == "dense":
            return
        q, k = call.query[:, :, 0], call.key
        b, hq, d = q.shape
        hkv, n = k.shape[1], k.shape[2]
        g, p = hq // hkv, self.m.page
        k8, ks = quantize_rows(k)
        want = torch.zeros(b, hkv, n, dtype=torch.bool)
        n_all = -(-n // p)
        for i in range(b):
            for h in range(hkv):
                qq, qs = quantize_rows(q[i, h * g : (h + 1) * g])
                s = ((qq.float() @ k8[i, h].float().T) * qs[:, None] * ks[i, h][None]).amax(0)  # (n,)
                pages = [float(s[j * p : (j + 1) * p].max()) for j in range(n_all - 1)]
                top = sorted(range(n_all - 1), key=lambda j: (-pages[j], j))[: self.m.n_pages(n) - 1]
                for j in top + [n_all - 1]:
                    want[i, h, j * p : (j + 1) * p] = True
        assert torch.equal(selection.mask(n).expand_as(want), want)
        self.checked += 1


def test_quest_int8_picks_the_brute_force_pages():
    model = tiny_model("llama")
    m = Quest(budget=8, page=2, dense_layers=0, bound="int8")
    ids, mask = tiny_inputs(2, 31, seed=7)
    obs = PageMaxBruteForce(m)
    with torch.no_grad(), ts.sparsify(model, m, observers=[obs]) as s:
        model.generate(ids, attention_mask=mask, cache=s.new_cache(), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False, pad_token_id=0)
    assert obs.checked == 2 * 4


def test_added_fields_keep_stored_run_keys():
    assert "bound" not in Quest(budget=0.25).config_dict()
    assert "shadow" not in ts.methods.get("token_select")(budget=0.25).config_dict()
    assert Quest(budget=0.25, bound="int8").config_dict()["bound"] == "int8"
