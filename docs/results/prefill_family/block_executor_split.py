"""Where the sdpa block executor's time goes on one realistic 8K layer, and whether taking the
causal mask out of its kernel calls helps (issue 12: the 4x attention-only bar).

One 8K layer of SmolLM2's shape (9 query heads, 3 KV heads, head dim 64), blocks of 64, one shared
selection like DHSA's defaults (the first block, the 4 most recent blocks, 11 more at random: 16
per query block, 0.11 of the causal pairs). Timed, 1 thread, variants interleaved, 5 rounds:

* ``executor``: ``engine.blocks._sdpa`` as the engine runs it (each query block's gathered blocks,
  its own block last under one shared additive causal mask, one CPU flash call per width group);
* ``split``: the same gathers without the own block and without a mask, plus one causal flash
  call over every diagonal block at once, merged by log-sum-exp (a candidate replacement);
* ``kernel only``: the flash calls of ``split`` on pre-gathered inputs (no gathers, no merge);
* ``gathers only``: the block gathers alone;
* ``dense``: SDPA's causal kernel over the whole layer (GQA).

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/prefill_family/block_executor_split.py
"""

import statistics
import time

import torch

from tokensparse.engine import blocks as B
from tokensparse.engine.blocks import _blockset, _flash_cpu, _gather_blocks, blocks_from_sets, merge_partials, width_groups
from tokensparse.engine.selection import indices_from_mask

L, HQ, HKV, D, BS, PER = 8192, 9, 3, 64, 64, 16


def selection():
    nb = L // BS
    i = torch.arange(nb)
    sets = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    sets[..., 0] = True
    for o in range(4):
        sets[0, 0, i, (i - o).clamp_min(0)] = True
    g = torch.Generator().manual_seed(1)
    for qi in range(2, nb):
        sets[0, 0, qi, torch.randperm(qi, generator=g)[: PER - 5]] = True
    return blocks_from_sets(sets & (i[None, :] <= i[:, None]), BS, BS), sets


def earlier_calls(q, k, v, sel):
    """(query block ids, gathered q, k, v) per call of ``split``'s unmasked part."""
    b, hq, _, d = q.shape
    nb, h = sel.idx.shape[2], HKV
    gh = hq // h
    i = torch.arange(nb)
    earlier = _blockset(sel.idx, sel.valid, nb).expand(b, h, nb, nb) & (i[None, :] < i[:, None])
    q6 = q.view(b, h, gh, nb, BS, d)
    heads = torch.arange(h)
    for width, group in width_groups(earlier):
        step = max(1, B.SDPA_CHUNK_BYTES // (b * h * width * BS * d * 4))
        for blocks in group.split(step):
            e_idx, _ = indices_from_mask(earlier[:, :, blocks], width)
            qe = q6[:, :, :, blocks].permute(0, 3, 1, 2, 4, 5).reshape(b * len(blocks), h, gh * BS, d)
            yield blocks, qe, _gather_blocks(k, e_idx, heads, BS), _gather_blocks(v, e_idx, heads, BS)


def split(q, k, v, sel):
    b, hq, _, d = q.shape
    nb, h = L // BS, HKV
    gh = hq // h
    oe = torch.zeros(b, nb, h, gh * BS, d)
    le = torch.full((b, nb, h, gh * BS), float("-inf"))
    for blocks, qe, ke, ve in earlier_calls(q, k, v, sel):
        o, lse = _flash_cpu(qe, ke, ve, 0.125)
        oe[:, blocks] = o.reshape(b, len(blocks), h, gh * BS, d)
        le[:, blocks] = lse.reshape(b, len(blocks), h, gh * BS)
    qd = q.view(b, h, gh, nb, BS, d).permute(0, 3, 1, 2, 4, 5).reshape(b * nb, hq, BS, d)
    kd, vd = (x.view(b, h, nb, BS, d).permute(0, 2, 1, 3, 4)[:, :, :, None].expand(b, nb, h, gh, BS, d)
              .reshape(b * nb, hq, BS, d) for x in (k, v))
    od, ld = _flash_cpu(qd, kd, vd, 0.125, causal=True)
    out, lse = merge_partials([(oe, le), (od.reshape(b, nb, h, gh * BS, d), ld.reshape(b, nb, h, gh * BS))])
    out = out.view(b, nb, h, gh, BS, d).permute(0, 2, 3, 1, 4, 5).reshape(b, hq, L, d)
    return out, lse.view(b, nb, h, gh, BS).permute(0, 2, 3, 1, 4).reshape(b, hq, L)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sel, sets = selection()
    q, k, v = (torch.randn(1, n, L, D) for n in (HQ, HKV, HKV))
    ref, ref_lse = B._sdpa(q, k, v, sel.idx, sel.valid, BS, BS, 0.125, None, True)
    out, lse = split(q, k, v, sel)
    print(f"split vs executor: max |out| diff {(out - ref).abs().max():.2e}, max |lse| diff {(lse - ref_lse).abs().max():.2e}")
    calls = [c[1:] for c in earlier_calls(q, k, v, sel)]
    pairs = sum(qe.shape[0] * qe.shape[1] * qe.shape[2] * ke.shape[2] for qe, ke, _ in calls)
    variants = {
        "executor": lambda: B._sdpa(q, k, v, sel.idx, sel.valid, BS, BS, 0.125, None, True),
        "split": lambda: split(q, k, v, sel),
        "kernel only (split's unmasked calls)": lambda: [_flash_cpu(*c, 0.125) for c in calls],
        "gathers only": lambda: list(earlier_calls(q, k, v, sel)),
        "dense causal SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    times = {name: [] for name in variants}
    for _ in range(5):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    kept = float(sets.float().sum() / (L // BS) ** 2)
    dense = statistics.median(times["dense causal SDPA"])
    print(f"kept share {kept:.3f} of all pairs (dense causal: 0.50); earlier-block pairs {pairs / 1e6:.1f} M "
          f"of dense's {HQ * L * L / 2 / 1e6:.1f} M")
    print("| variant | median s | range | ns per pair read |")
    print("|---|--:|--:|--:|")
    for name, ts in times.items():
        n = HQ * L * L / 2 if name.startswith("dense") else (pairs if name.startswith("kernel") else kept * HQ * L * L)
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f}–{max(ts):.3f} | "
              f"{statistics.median(ts) / n * 1e9:.2f} |")
    print(f"dense per pair: {dense / (HQ * L * L / 2) * 1e9:.2f} ns")
