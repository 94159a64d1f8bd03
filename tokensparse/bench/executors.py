"""Attention-only microbenchmark: each executor against dense SDPA on random tensors, no model.

Shapes follow the bundled SmolLM2-135M by default (batch 1, 9 query heads, 3 KV heads, head dim
64, fp32), laid out as the engine receives them: ``q`` is the transposed view transformers passes
(built as ``(B, Lq, Hq, D)`` then ``.transpose(1, 2)``), ``k``/``v`` are prefixes
``buf[:, :, :L]`` of a preallocated ``(B, Hkv, L + headroom, D)`` buffer, as :class:`KVCache`
hands them over. For every length ``L`` and density ``ρ`` a selection has ``n = round(ρ L)``
keys (at least ``keep_last``): the last ``keep_last`` positions plus the rest drawn at random per
head, sorted.

* **prefill** (``Lq = Lk = L``): :func:`dense_attention` (causal SDPA) vs
  :func:`compress_attend_scatter` with ``idx`` per query head (the paper) and per KV head.
  Ideal speed-up ``1/ρ²`` (causal attention FLOPs scale with the square of the tokens kept).
* **decode** (``Lq = 1``): :func:`dense_attention` over the whole cache vs :func:`gather_attend`
  with ``idx (B, Hkv, n)``, and vs :func:`segments_attend` over three segments: 4 sink rows and the
  last ``min(64, n // 2)`` rows (cache views, no copy) plus the rest of the budget gathered from the
  rows between them with :func:`gather_rows`. Ideal speed-up ``1/ρ`` (the keys read).

What is timed: the executor call only, including everything it does to the selected rows (the
gather of Q/K/V rows, the attention, the scatter back; for ``segments_attend`` the
``gather_rows`` of the middle segment, which the engine redoes whenever the selection changes).
What is not timed: building the tensors and the buffer, drawing ``idx`` (in a method: scoring
and top-k; ``tokensparse bench attention`` times Token Sparse's on real tensors), and the
correctness check.

Per case: every output, dense included, is first checked against an fp32 oracle computed from the
definition with :func:`reference_attention`, and the max abs error is recorded (a run aborts past
``1e-3`` in fp32/fp64, ``3e-2`` in bf16/fp16). Decode: the whole output (one query row) against
the reference with the equivalent key mask. Prefill: a full ``L × L`` reference is 17 GB per head
in fp32 at 64K and 69 GB at 128K, so the gate checks a seeded sample of ``check_rows`` query rows
per head (every row when ``L <= check_rows``): always the last row, up to half of the rest drawn
from the head's selected positions (the rows a token-sparse output is not zero by construction)
and the rest uniformly; the reference of those rows alone costs ``check_rows × L`` per head.
Unselected rows of a sparse output in the sample are checked to be exactly what the definition
says (zero). A sample can miss an error confined to rows it did not draw; the seed and the row
count are recorded with the results.

Then every variant is warmed up and the variants are timed interleaved, ``repeats`` times. A
decode sample is a loop of ``decode_calls`` calls divided by ``decode_calls`` (one call is ~0.1
ms). On CUDA the device is synchronised before and at the end of each timed region
(:func:`tokensparse.bench.timed`). Reported: median ms with min–max, ``speedup_vs_dense`` = dense
median / executor median, both measured in the same process in the same interleaved rounds, and
on CUDA the peak device memory of one call of each variant, measured in an extra untimed call
(``peak_device_bytes``: the case's inputs, which stay allocated, included; ``None`` on CPU).

``model_config`` takes the attention shape (query heads, KV heads, head size) of a named model
(:mod:`tokensparse.bench.model_configs`), e.g. ``llama-3.1-8b``: 32/8/128.
"""

from __future__ import annotations

import torch

from tokensparse.engine.executors import (
    compress_attend_scatter,
    dense_attention,
    gather_attend,
    gather_rows,
    reference_attention,
    segments_attend,
)

from . import environment, peak_memory_bytes, reset_peak_memory, spread, sync, timed

DEFAULT_LENGTHS = (2048, 4096, 8192)
DEFAULT_DENSITIES = (0.1, 0.25, 0.5)

#: max abs error tolerated against the fp32 reference: fp32/fp64 inputs, half-precision inputs
TOLERANCE, HALF_TOLERANCE = 1e-3, 3e-2

N_SINK = 4
N_LOCAL = 64

#: query rows per head the prefill correctness gate checks (see the module docstring)
CHECK_ROWS = 64


def validate(lengths, densities, repeats: int) -> None:
    """Raise ``ValueError`` naming the bad input."""
    if not lengths or any(int(n) != n or n < 64 for n in lengths):
        raise ValueError(f"lengths must be integers >= 64, got {list(lengths)}")
    if not densities or any(not 0.0 < float(r) <= 1.0 for r in densities):
        raise ValueError(f"densities must lie in (0, 1], got {list(densities)}")
    if int(repeats) < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


def random_selection(length: int, n: int, heads: int, keep_last: int = 0, batch: int = 1, generator=None) -> torch.Tensor:
    """``(batch, heads, n)`` sorted distinct positions in ``[0, length)``, always holding the last
    ``keep_last`` (the rest drawn uniformly, independently per head)."""
    keep_last = min(keep_last, n)
    pool = length - keep_last
    drawn = torch.rand(batch, heads, pool, generator=generator).argsort(-1)[..., : n - keep_last]
    tail = torch.arange(pool, length).expand(batch, heads, keep_last)
    return torch.cat([drawn, tail], -1).sort(-1).values


def _key_mask(idx: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, H, 1, length)`` bool, True at the keys ``idx (B, H, n)`` (every query sees them)."""
    b, h, _ = idx.shape
    mask = torch.zeros(b, h, length, dtype=torch.bool, device=idx.device)
    return mask.scatter_(2, idx, True)[:, :, None]


def _ms_per_call(fn, calls: int, device: torch.device) -> float:
    def loop():
        for _ in range(calls):
            fn()

    return 1000 * timed(loop, device) / calls


def _interleaved(fns: dict, repeats: int, calls: int, warmup: int, device: torch.device) -> dict:
    """ms per call of each function, ``repeats`` samples each, the functions taking turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            samples[label].append(_ms_per_call(fn, calls, device))
    return samples


def _peaks(fns: dict, device: torch.device) -> dict:
    """Peak device bytes of one extra call of each function (CUDA); ``None`` each elsewhere, without
    calling anything. The inputs already allocated count: it is what the call needs on the device."""
    if device.type != "cuda":
        return {label: None for label in fns}
    out = {}
    for label, fn in fns.items():
        sync(device)
        reset_peak_memory(device)
        fn()
        sync(device)
        out[label] = peak_memory_bytes(device)
    return out


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check(err: float, tol: float, what: str) -> None:
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"{what}: max abs error {err:.3g} against the reference exceeds {tol:g}")


def rows_to_check(length: int, count: int, generator: torch.Generator, selected: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted distinct query rows (CPU ``int64``) the prefill gate checks: all ``length`` rows if
    ``count >= length``; else the last row, up to half of ``count`` drawn from ``selected`` (1-D
    positions, e.g. a head's selection) and the rest uniformly from ``[0, length)``."""
    if count >= length:
        return torch.arange(length)
    rows = {length - 1}
    if selected is not None:
        pool = selected[selected != length - 1].cpu()
        take = min(pool.numel(), (count - 1) // 2)
        rows.update(pool[torch.randperm(pool.numel(), generator=generator)[:take]].tolist())
    for r in torch.randperm(length, generator=generator).tolist():
        if len(rows) >= count:
            break
        rows.add(r)
    return torch.tensor(sorted(rows))


def sampled_reference(q, k, v, rows: torch.Tensor, scale: float, selected: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 causal attention of query rows ``rows`` only: ``(B, 1, r, Dv)`` for one query head.

    ``q (B, 1, L, D)``, ``k``/``v (B, 1, L, D)`` (the head's KV head). ``selected (B, L)`` bool makes it
    token-sparse attention by definition: a selected query row attends to the selected keys at or
    before it; an unselected row is zero. Costs ``r × L`` (never ``L × L``)."""
    b, length = q.shape[0], k.shape[2]
    dev = q.device
    r = rows.to(dev)
    keys = torch.arange(length, device=dev)
    allowed = (keys[None, :] <= r[:, None])[None, None].expand(b, 1, r.numel(), length)  # (B, 1, r, L)
    if selected is not None:
        allowed = allowed & selected[:, None, None, :]
        allowed = allowed | (keys[None, :] == r[:, None])[None, None]  # unselected rows stay finite; zeroed below
    out = reference_attention(q[:, :, r].float(), k.float(), v.float(), allowed, scale)
    if selected is not None:
        out = out * selected[:, r][:, None, :, None].to(out.dtype)
    return out


def _prefill_errors(q, k, v, out_dense, sparse, scale, check_rows: int, generator: torch.Generator) -> dict:
    """Max abs error of each prefill output against :func:`sampled_reference` over a sample of
    ``check_rows`` query rows per head (:func:`rows_to_check`), one query head at a time."""
    b, hq, length = q.shape[0], q.shape[1], q.shape[2]
    g = hq // k.shape[1]
    errs = {"dense": 0.0, **{label: 0.0 for label in sparse}}
    for h in range(hq):
        j = h // g
        qh, kh, vh = q[:, h : h + 1], k[:, j : j + 1], v[:, j : j + 1]
        rows = rows_to_check(length, check_rows, generator)
        ref = sampled_reference(qh, kh, vh, rows, scale)
        errs["dense"] = max(errs["dense"], _max_err(out_dense[:, h : h + 1, rows.to(q.device)], ref))
        for label, (idx, out) in sparse.items():
            ih = idx[:, h] if idx.shape[1] == hq else idx[:, j]  # (B, n)
            sel = torch.zeros(b, length, dtype=torch.bool, device=q.device).scatter_(1, ih, True)
            rows = rows_to_check(length, check_rows, generator, selected=ih[0])
            ref = sampled_reference(qh, kh, vh, rows, scale, sel)
            errs[label] = max(errs[label], _max_err(out[:, h : h + 1, rows.to(q.device)], ref))
    return errs


def _row(case, length, density, n, executor, label, ms, dense_ms, ideal, err, **extra) -> dict:
    s = spread(ms)
    return {
        "case": case, "length": length, "density": density, "n": n, "kept_share": n / length,
        "executor": executor, "variant": label, "ms": s, "speedup_vs_dense": dense_ms / s["median"],
        "ideal_speedup": ideal, "max_abs_err": err, **extra,
    }


@torch.inference_mode()
def run(
    lengths=DEFAULT_LENGTHS,
    densities=DEFAULT_DENSITIES,
    repeats: int = 5,
    device="cpu",
    dtype=torch.float32,
    batch: int = 1,
    q_heads: int = 9,
    kv_heads: int = 3,
    head_dim: int = 64,
    headroom: int = 256,
    keep_last: int = 16,
    decode_calls: int = 50,
    warmup: int = 2,
    seed: int = 0,
    check_rows: int = CHECK_ROWS,
    model_config: str | None = None,
    progress: bool = False,
) -> dict:
    """Time every executor against dense SDPA; returns ``{"env", "kind", "config", "results"}``.

    Parameters
    ----------
    lengths, densities:
        Context lengths (>= 64) and kept shares ρ in (0, 1]; every pair is one prefill and one
        decode case. ``n = max(round(ρ L), keep_last)`` keys are kept.
    repeats:
        Interleaved timing rounds per case (each a sample of every variant).
    device, dtype:
        Where and in what precision the tensors live (CUDA is synchronised around timed regions).
    batch, q_heads, kv_heads, head_dim:
        Attention shape; defaults are SmolLM2-135M's.
    headroom:
        Spare rows of the preallocated K/V buffer beyond ``L`` (the engine's default).
    keep_last:
        Trailing positions every selection holds (the paper's local window of recent queries).
    decode_calls:
        Calls per decode sample (one call is too short to time alone).
    warmup:
        Untimed calls of each variant before the rounds.
    seed:
        Seeds the tensors, the selections and the rows the prefill gate checks.
    check_rows:
        Query rows per head the prefill correctness gate checks (all of them when ``L <= check_rows``).
    model_config:
        Only recorded: the name of the model whose attention shape ``q_heads``/``kv_heads``/``head_dim``
        were taken from (the CLI passes both).
    """
    from tqdm.auto import tqdm

    lengths = [int(x) for x in lengths]
    densities = [float(x) for x in densities]
    validate(lengths, densities, repeats)
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if decode_calls < 1 or warmup < 0:
        raise ValueError(f"decode_calls must be >= 1 and warmup >= 0, got {decode_calls} and {warmup}")
    if check_rows < 1:
        raise ValueError(f"check_rows must be >= 1, got {check_rows}")
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tol = TOLERANCE if dtype in (torch.float32, torch.float64) else HALF_TOLERANCE
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(seed)
    check_gen = torch.Generator().manual_seed(seed + 1)  # the gate's rows: drawn apart from the tensors

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    out = {
        "env": environment(device, dtype), "kind": "attention executors",
        "config": {"batch": batch, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
                   "model_config": model_config, "headroom": headroom, "keep_last": keep_last, "repeats": repeats,
                   "decode_calls": decode_calls, "warmup": warmup, "seed": seed, "tolerance": tol,
                   "check_rows": check_rows},
        "results": [],
    }
    cases = [(length, rho) for length in lengths for rho in densities]
    for length, rho in tqdm(cases, desc="executors", disable=not progress):
        n = min(length, max(round(rho * length), keep_last))
        kbuf = randn(batch, kv_heads, length + headroom, head_dim)  # (B, Hkv, cap, D)
        vbuf = randn(batch, kv_heads, length + headroom, head_dim)
        k, v = kbuf[:, :, :length], vbuf[:, :, :length]  # (B, Hkv, L, D) cache views
        where = f"L={length} ρ={rho}"

        # ---- prefill -------------------------------------------------------------------------
        q = randn(batch, length, q_heads, head_dim).transpose(1, 2)  # (B, Hq, L, D) view
        idx_q = random_selection(length, n, q_heads, keep_last, batch, gen).to(device)  # (B, Hq, n)
        idx_kv = random_selection(length, n, kv_heads, keep_last, batch, gen).to(device)  # (B, Hkv, n)
        fns = {
            "dense": lambda: dense_attention(q, k, v, None, scale),
            "query": lambda: compress_attend_scatter(q, k, v, idx_q, scale),
            "kv": lambda: compress_attend_scatter(q, k, v, idx_kv, scale),
        }
        sparse_out = {"query": (idx_q, fns["query"]()), "kv": (idx_kv, fns["kv"]())}
        errs = _prefill_errors(q, k, v, fns["dense"](), sparse_out, scale, check_rows, check_gen)
        del sparse_out
        for label, err in errs.items():
            _check(err, tol, f"prefill {label} {where}")
        ms = _interleaved(fns, repeats, 1, warmup, device)
        peak = _peaks(fns, device)
        dense_ms = spread(ms["dense"])["median"]
        ideal = (length / n) ** 2
        out["results"] += [
            _row("prefill", length, rho, length, "dense_attention", "dense SDPA (causal)", ms["dense"], dense_ms, 1.0,
                 errs["dense"], peak_device_bytes=peak["dense"]),
            _row("prefill", length, rho, n, "compress_attend_scatter", "compress_attend_scatter, idx per query head",
                 ms["query"], dense_ms, ideal, errs["query"], idx_heads="query", peak_device_bytes=peak["query"]),
            _row("prefill", length, rho, n, "compress_attend_scatter", "compress_attend_scatter, idx per KV head",
                 ms["kv"], dense_ms, ideal, errs["kv"], idx_heads="kv", peak_device_bytes=peak["kv"]),
        ]
        del q, fns

        # ---- decode --------------------------------------------------------------------------
        q = randn(batch, 1, q_heads, head_dim).transpose(1, 2)  # (B, Hq, 1, D) view
        idx = random_selection(length, n, kv_heads, keep_last, batch, gen).to(device)  # (B, Hkv, n)
        n_local = min(N_LOCAL, n // 2)
        n_mid = n - N_SINK - n_local  # gathered from the rows between the sink and the window
        mid = N_SINK + random_selection(length - N_SINK - n_local, n_mid, kv_heads, 0, batch, gen).to(device)
        sink = (k[:, :, :N_SINK], v[:, :, :N_SINK])
        local = (k[:, :, length - n_local :], v[:, :, length - n_local :])

        def segmented():
            return segments_attend(q, [sink, (gather_rows(k, mid), gather_rows(v, mid)), local], scale)

        fns = {
            "dense": lambda: dense_attention(q, k, v, None, scale),
            "gather": lambda: gather_attend(q, k, v, idx, scale),
            "segments": segmented,
        }
        seg_idx = torch.cat([torch.arange(N_SINK, device=device).expand(batch, kv_heads, N_SINK), mid,
                             torch.arange(length - n_local, length, device=device).expand(batch, kv_heads, n_local)], -1)
        errs = {
            "dense": _max_err(fns["dense"](), reference_attention(q, k, v, None, scale)),
            "gather": _max_err(fns["gather"](), reference_attention(q, k, v, _key_mask(idx, length), scale)),
            "segments": _max_err(segmented(), reference_attention(q, k, v, _key_mask(seg_idx, length), scale)),
        }
        for label, err in errs.items():
            _check(err, tol, f"decode {label} {where}")
        ms = _interleaved(fns, repeats, decode_calls, warmup, device)
        peak = _peaks(fns, device)
        dense_ms = spread(ms["dense"])["median"]
        ideal = length / n
        out["results"] += [
            _row("decode", length, rho, length, "dense_attention", "dense SDPA", ms["dense"], dense_ms, 1.0,
                 errs["dense"], calls_per_sample=decode_calls, peak_device_bytes=peak["dense"]),
            _row("decode", length, rho, n, "gather_attend", "gather_attend, idx per KV head", ms["gather"], dense_ms,
                 ideal, errs["gather"], idx_heads="kv", calls_per_sample=decode_calls, peak_device_bytes=peak["gather"]),
            _row("decode", length, rho, n, "segments_attend",
                 f"segments_attend, {N_SINK} sink + {n_mid} gathered + {n_local} local",
                 ms["segments"], dense_ms, ideal, errs["segments"], idx_heads="kv", calls_per_sample=decode_calls,
                 segments={"sink": N_SINK, "gathered": n_mid, "local": n_local}, peak_device_bytes=peak["segments"]),
        ]
    return out


def _fmt_ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def format_table(result: dict) -> str:
    """The rows of :func:`run` as a plain-text table (one line per variant and case)."""
    header = ("length", "density", "keys", "case", "executor", "ms median [min–max]", "vs dense", "ideal", "max err")
    lines = []
    for r in result["results"]:
        s = r["ms"]
        dense = r["executor"] == "dense_attention"
        lines.append((
            str(r["length"]), f"{r['density']:g}", str(r["n"]), r["case"], r["variant"],
            f"{_fmt_ms(s['median'])} [{_fmt_ms(s['min'])}–{_fmt_ms(s['max'])}]",
            f"{r['speedup_vs_dense']:.2f}×", "—" if dense else f"{r['ideal_speedup']:.1f}×", f"{r['max_abs_err']:.1e}",
        ))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    right = {0, 1, 2, 5, 6, 7, 8}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    env = result.get("env", {})
    cfg = result.get("config", {})
    gpu = f" {env['gpu']['name']}" if env.get("gpu") else ""
    foot = (f"({env.get('device', '?')}{gpu}, {env.get('dtype', '?')}, threads={env.get('threads', '?')}, torch {env.get('torch', '?')}; "
            f"B={cfg.get('batch')} Hq={cfg.get('q_heads')} Hkv={cfg.get('kv_heads')} D={cfg.get('head_dim')}"
            + (f" ({cfg['model_config']})" if cfg.get("model_config") else "") + "; "
            f"median of {cfg.get('repeats')} interleaved rounds, decode per call over {cfg.get('decode_calls')} calls; "
            "ideal = 1/ρ² prefill, 1/ρ decode)")
    return "\n".join([fmt(header), rule, *map(fmt, lines), "", foot])
