"""The CUDA checks of the GPU lane (issue 13): skipped where no CUDA device exists, which is every
CI run; run on a lent GPU with ``pytest tests/test_cuda.py`` (docs/results/gpu/README.md).

* decode steps never synchronise the host: dense decode on the engine's cache and the fixed-budget
  decode methods, under ``torch.cuda.set_sync_debug_mode("error")`` (through
  :func:`~tokensparse.engine.hostsync.forbid_host_syncs`), unpadded without a mask; padded with a
  mask, only the documented reads of ``tests/test_hostsync.py``'s ``ALLOWED`` list;
* in bf16, SDPA never falls back to its MATH kernel (which materialises ``L×L`` scores): prefill
  and decode, dense and sparse, run with MATH switched off (``sdpa_kernel``), so a call that needs
  it raises;
* every registered method at full budget equals dense attention on CUDA (tiny Llama, prefill and
  decode, batch 1 and a left-padded batch 2, fp32 and bf16), as the CPU matrix checks on the CPU;
* the compiled FlexAttention block executor (``impl="auto"`` on CUDA) equals the reference
  executor, with its log-sum-exp.
"""

import pytest
import torch

import tokensparse as ts
from tokensparse.engine.blocks import block_attend, blocks_from_sets
from tokensparse.engine.hostsync import count_host_syncs, forbid_host_syncs
from tokensparse.testing import TOLERANCE, max_diff, tiny_inputs, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"
M = ts.methods.get

#: fixed-budget decode methods, sparse on a 40-token prompt (the set tests/test_hostsync.py checks on CPU)
DECODE = {
    "dense": lambda: None,
    "token_select": lambda: M("token_select")(budget=24, n_sink=2, n_local=6),
    "quest": lambda: M("quest")(budget=16, page=4, dense_layers=1),
    "tidal_decode": lambda: M("tidal_decode")(budget=12, selection_layers=[1]),
    "streaming_llm": lambda: M("streaming_llm")(budget=20, n_sink=2),
    "snapkv": lambda: M("snapkv").at_sparse_budget(),
    "fasa": lambda: M("fasa")(budget=10, chunks=2, fcs="low", dense_layers=1),
    "recycled_attention": lambda: M("recycled_attention")(budget=16, stride=2, n_sink=2, n_local=2, pool_kernel=3),
    "h2o": lambda: M("h2o")(budget=16, window=4),
    "tova": lambda: M("tova")(budget=16),
}


def _model(dtype=torch.float32, layers=3):
    return tiny_model("llama", dtype, num_hidden_layers=layers).to(CUDA)


def _decode(model, method, batch, pad, steps, guard, with_mask):
    """Prefill, then ``steps`` greedy decode steps each under ``guard()``: the logits of every step."""
    ids, mask = (t.to(CUDA) for t in tiny_inputs(batch, 40, pad=pad))
    logs, logits = [], []
    ctx = ts.sparsify(model, method) if method is not None else None
    with torch.no_grad():
        s = ctx.__enter__() if ctx is not None else None
        try:
            cache = s.new_cache() if s is not None else ts.KVCache(model)
            out = model(ids, attention_mask=mask, cache=cache)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                kw = dict(attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1) if with_mask else {}
                with guard() as log:
                    out = model(tok, cache=cache, **kw)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                logs.append(log)
                logits.append(out.logits)
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    return logs, torch.stack(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(DECODE))
def test_decode_steps_never_synchronise_on_cuda(name, dtype):
    _decode(_model(dtype), DECODE[name](), 1, 0, steps=4, guard=forbid_host_syncs, with_mask=False)


@pytest.mark.parametrize("name", list(DECODE))
def test_padded_decode_steps_make_only_the_documented_reads_on_cuda(name):
    from test_hostsync import ALLOWED, _unexplained

    logs, _ = _decode(_model(), DECODE[name](), 2, 3, steps=4, guard=count_host_syncs, with_mask=True)
    for step, log in enumerate(logs):
        assert not _unexplained(log, ALLOWED), f"{name} step {step}:\n{log.report()}"


@pytest.mark.parametrize("name", list(DECODE))
def test_bf16_sdpa_never_needs_the_math_kernel(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    model = _model(torch.bfloat16)
    for batch, pad, with_mask in ((1, 0, False), (2, 3, True)):
        with sdpa_kernel(fast):
            _decode(model, DECODE[name](), batch, pad, steps=3, guard=count_host_syncs, with_mask=with_mask)


_models: dict = {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "b2-leftpad"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", ts.methods.names())
def test_full_budget_equals_dense_on_cuda(name, mode, batch, dtype):
    from test_matrix import run

    if dtype not in _models:
        _models[dtype] = tiny_model("llama", dtype).to(CUDA)
    model = _models[dtype]
    ids, mask = (t.to(CUDA) for t in tiny_inputs(batch, 40, pad=5 if batch == 2 else 0))
    method = M(name).at_full_budget()
    ref_logits, ref_seq = run(model, mode, ids, mask)
    logits, seq = run(model, mode, ids, mask, method)
    assert logits.device.type == CUDA
    assert max_diff(logits, ref_logits, mask if mode == "prefill" else None) <= TOLERANCE[dtype]
    if seq is not None:
        assert torch.equal(seq, ref_seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", [64])  # the block methods' default size
def test_flex_block_executor_equals_reference_on_cuda(block, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    b, hq, hkv, length, d = 2, 8, 2, 1000, 64
    q = torch.randn(b, hq, length, d, device=CUDA, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, device=CUDA, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, device=CUDA, generator=g).to(dtype)
    nb = -(-length // block)
    sets = torch.rand(b, hkv, nb, nb, device=CUDA, generator=g) < 0.4
    sel = blocks_from_sets(sets, block, block)
    ref, ref_lse = block_attend(q.float(), k.float(), v.float(), sel, 0.125, impl="reference", return_lse=True)
    out, lse = block_attend(q, k, v, sel, 0.125, impl="auto", return_lse=True)
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() <= tol
    fin = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), fin)
    assert (lse[fin] - ref_lse[fin]).abs().max().item() <= tol


def test_engine_decode_calls_prefer_flash_over_cudnn():
    """On an H200 with torch 2.11 SDPA picks cuDNN for a one-query call and rebuilds its plan on
    every new key length (1.35 ms of host time per call); the engine's decode calls go to flash."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    names = []

    @contextlib.contextmanager
    def profiled():  # the decode steps only (the 40-token prefill may take cuDNN)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            yield None
        names.extend(e.key for e in prof.key_averages())

    _decode(_model(torch.bfloat16), DECODE["token_select"](), 1, 0, steps=2, guard=profiled, with_mask=False)
    assert any("flash" in n.lower() for n in names), names
    assert not any("cudnn_attention" in n.lower() for n in names), [n for n in names if "cudnn" in n.lower()]
