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

Per case: every output, dense included, is first checked against the fp32 oracle (prefill: the
executor's own ``impl="reference"`` and :func:`reference_attention`, one query head at a time to
bound memory; decode: :func:`reference_attention` with the equivalent key mask), and the max abs
error is recorded (a run aborts past ``1e-3`` in fp32);
then every variant is warmed up and the variants are timed interleaved, ``repeats`` times. A
decode sample is a loop of ``decode_calls`` calls divided by ``decode_calls`` (one call is ~0.1
ms). On CUDA the device is synchronised before and at the end of each timed region. Reported:
median ms with min–max, and ``speedup_vs_dense`` = dense median / executor median, both measured
in the same process in the same interleaved rounds.
"""

from __future__ import annotations

import torch

from tokensparse.demo import environment
from tokensparse.engine.executors import (
    compress_attend_scatter,
    dense_attention,
    gather_attend,
    gather_rows,
    reference_attention,
    segments_attend,
)

from . import spread, timed

DEFAULT_LENGTHS = (2048, 4096, 8192)
DEFAULT_DENSITIES = (0.1, 0.25, 0.5)

#: max abs error tolerated against the fp32 reference: fp32/fp64 inputs, half-precision inputs
TOLERANCE, HALF_TOLERANCE = 1e-3, 3e-2

N_SINK = 4
N_LOCAL = 64


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_per_call(fn, calls: int, device: torch.device) -> float:
    def loop():
        for _ in range(calls):
            fn()
        _sync(device)

    _sync(device)
    return 1000 * timed(loop) / calls


def _interleaved(fns: dict, repeats: int, calls: int, warmup: int, device: torch.device) -> dict:
    """ms per call of each function, ``repeats`` samples each, the functions taking turns."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            samples[label].append(_ms_per_call(fn, calls, device))
    return samples


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check(err: float, tol: float, what: str) -> None:
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"{what}: max abs error {err:.3g} against the reference exceeds {tol:g}")


def _prefill_errors(q, k, v, out_dense, sparse, scale) -> dict:
    """Max abs error of each output against the reference, one query head at a time (the
    reference materialises ``L × L`` logits and masks; per head that is ~1 GB at 8K in fp32)."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    errs = {"dense": 0.0, **{label: 0.0 for label in sparse}}
    for h in range(hq):
        j = h // g
        qh, kh, vh = q[:, h : h + 1], k[:, j : j + 1], v[:, j : j + 1]
        ref = reference_attention(qh, kh, vh, None, scale)
        errs["dense"] = max(errs["dense"], _max_err(out_dense[:, h : h + 1], ref))
        del ref
        for label, (idx, out) in sparse.items():
            ih = idx[:, h : h + 1] if idx.shape[1] == hq else idx[:, j : j + 1]
            ref = compress_attend_scatter(qh, kh, vh, ih, scale, impl="reference")
            errs[label] = max(errs[label], _max_err(out[:, h : h + 1], ref))
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
    """
    from tqdm.auto import tqdm

    lengths = [int(x) for x in lengths]
    densities = [float(x) for x in densities]
    validate(lengths, densities, repeats)
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if decode_calls < 1 or warmup < 0:
        raise ValueError(f"decode_calls must be >= 1 and warmup >= 0, got {decode_calls} and {warmup}")
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tol = TOLERANCE if dtype in (torch.float32, torch.float64) else HALF_TOLERANCE
    scale = head_dim**-0.5
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    env = environment()
    env.update(dtype=str(dtype).removeprefix("torch."), device=str(device))
    out = {
        "env": env, "kind": "attention executors",
        "config": {"batch": batch, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
                   "headroom": headroom, "keep_last": keep_last, "repeats": repeats,
                   "decode_calls": decode_calls, "warmup": warmup, "seed": seed, "tolerance": tol},
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
        errs = _prefill_errors(q, k, v, fns["dense"](), sparse_out, scale)
        del sparse_out
        for label, err in errs.items():
            _check(err, tol, f"prefill {label} {where}")
        ms = _interleaved(fns, repeats, 1, warmup, device)
        dense_ms = spread(ms["dense"])["median"]
        ideal = (length / n) ** 2
        out["results"] += [
            _row("prefill", length, rho, length, "dense_attention", "dense SDPA (causal)", ms["dense"], dense_ms, 1.0, errs["dense"]),
            _row("prefill", length, rho, n, "compress_attend_scatter", "compress_attend_scatter, idx per query head",
                 ms["query"], dense_ms, ideal, errs["query"], idx_heads="query"),
            _row("prefill", length, rho, n, "compress_attend_scatter", "compress_attend_scatter, idx per KV head",
                 ms["kv"], dense_ms, ideal, errs["kv"], idx_heads="kv"),
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
        dense_ms = spread(ms["dense"])["median"]
        ideal = length / n
        out["results"] += [
            _row("decode", length, rho, length, "dense_attention", "dense SDPA", ms["dense"], dense_ms, 1.0,
                 errs["dense"], calls_per_sample=decode_calls),
            _row("decode", length, rho, n, "gather_attend", "gather_attend, idx per KV head", ms["gather"], dense_ms,
                 ideal, errs["gather"], idx_heads="kv", calls_per_sample=decode_calls),
            _row("decode", length, rho, n, "segments_attend",
                 f"segments_attend, {N_SINK} sink + {n_mid} gathered + {n_local} local",
                 ms["segments"], dense_ms, ideal, errs["segments"], idx_heads="kv", calls_per_sample=decode_calls,
                 segments={"sink": N_SINK, "gathered": n_mid, "local": n_local}),
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
    foot = (f"({env.get('device', '?')}, {env.get('dtype', '?')}, threads={env.get('threads', '?')}, torch {env.get('torch', '?')}; "
            f"B={cfg.get('batch')} Hq={cfg.get('q_heads')} Hkv={cfg.get('kv_heads')} D={cfg.get('head_dim')}; "
            f"median of {cfg.get('repeats')} interleaved rounds, decode per call over {cfg.get('decode_calls')} calls; "
            "ideal = 1/ρ² prefill, 1/ρ decode)")
    return "\n".join([fmt(header), rule, *map(fmt, lines), "", foot])
