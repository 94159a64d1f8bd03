"""How well FASA-style partial scores rank keys on SmolLM2 (issue 11, decode_suite/README.md).

For the last query of a prompt (it plays the first decode step) in layers 1-29, per KV head: the
exact top-k keys (the group's max of per-head softmaxes over full q.k, FASA's own reduction) against
the top-k by partial scores from the shipped frequency-chunk profile (rotate-half or adjacent
pairs, one FC set per KV head or per query head, 8 or 16 FCs, the profile's three budget slots), a
query-aware choice (per query head, the FCs of largest |q_c|*|k_c|) and an exact re-rank of the
2x / 4x partial top-k. Printed: recall of the exact top-k set and the share of the exact
attention mass (mean over query heads) the chosen keys hold, averaged over layers and samples.

    .venv/bin/python docs/results/decode_suite/fasa_recall.py [LENGTH=2048] [BUDGET=512]
"""
import sys

import torch

import tokensparse as ts
from tokensparse.engine.calibration import Profile, find_kind_profile
from tokensparse.engine.observers import Observer, observe_prompt
from tokensparse.eval.tasks import TASKS
from tokensparse.methods.fasa import KIND, KIND_VERSION, fc_dims
torch.set_num_threads(1)
model, tok = ts.load_model()
payload = Profile.load(find_kind_profile(model, KIND), KIND, KIND_VERSION).payload
L = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
BUD = int(sys.argv[2]) if len(sys.argv) > 2 else 512

class Cap(Observer):
    def __init__(self): self.q, self.k = {}, {}
    def on_call(self, call):
        self.q[call.layer_idx] = call.query[0, :, -1].float()
        self.k[call.layer_idx] = call.key[0].float()

def group_w(logits, hkv, g):  # logits (Hq, n) -> (Hkv, n)
    return logits.softmax(-1).view(hkv, g, -1).amax(1)

res = {}
for task in ["multivalue", "multiquery"]:
    for idx in range(2):
        s = TASKS[task](tok, L, seed=0, index=idx)
        ids = tok(s.prompt(), return_tensors="pt").input_ids
        cap = Cap(); observe_prompt(model, ids, cap)
        for li in range(1, 30):
            q, k = cap.q[li], cap.k[li]
            hq, d = q.shape; hkv = k.shape[0]; g = hq // hkv; n = k.shape[1]
            kq = k.repeat_interleave(g, 0)
            full = (q[:, None, :] @ kq.transpose(-1, -2))[:, 0] / d ** .5
            p = full.softmax(-1)
            w = group_w(full, hkv, g)
            kk = min(BUD, n)
            T = w.topk(kk, -1).indices
            def score(name, wpart, pool=1):
                if pool > 1:
                    C = wpart.topk(min(n, pool * kk), -1).indices
                    S = C.gather(-1, w.gather(-1, C).topk(kk, -1).indices)
                else:
                    S = wpart.topk(kk, -1).indices
                rec = torch.zeros(hkv)
                mass = 0.
                for h in range(hkv):
                    rec[h] = len(set(S[h].tolist()) & set(T[h].tolist())) / kk
                    mass += p[h*g:(h+1)*g][:, S[h]].sum(-1).mean().item() / hkv
                r = res.setdefault(name, [0., 0., 0])
                r[0] += rec.mean().item(); r[1] += mass; r[2] += 1
            score("exact", w)
            def part_dims(dims_kv):  # dims per KV head (Hkv, m) -> partial logits
                out = torch.empty(hq, n)
                for h in range(hq):
                    dd = dims_kv[h // g] if dims_kv.dim() == 2 else dims_kv[h]
                    out[h] = q[h, dd] @ kq[h][:, dd].T / d ** .5
                return out
            for lay in ["rotate_half", "adjacent"]:
                for slot in [0, 1, 2]:
                    ag = torch.tensor(payload["agreement"][lay][slot])[li]  # (Hq, D/2)
                    for m in [8, 16]:
                        if slot != 1 and m == 16: continue
                        perkv = ag.view(hkv, g, -1).mean(1).topk(m, -1).indices
                        wp = group_w(part_dims(fc_dims(perkv, d, lay)), hkv, g)
                        score(f"{lay} slot{slot} {m} kv", wp)
                        if lay == "rotate_half" and slot == 1 and m == 8:
                            score(f"{lay} slot{slot} {m} kv L{li//10}", wp)
                            for pool in (2, 4):
                                score(f"{lay} slot{slot} {m} kv rerank{pool}", wp, pool)
                        perq = ag.topk(m, -1).indices
                        score(f"{lay} slot{slot} {m} perq", group_w(part_dims(fc_dims(perq, d, lay)), hkv, g))
            # query-aware: per query head, FCs with the largest |q_c|^2 * mean |k_c|^2 (rotate_half)
            c = torch.arange(d // 2)
            dims = fc_dims(c[:, None], d, "rotate_half")
            qn = q[:, dims].pow(2).sum(-1)
            kn = kq[:, :, dims].pow(2).sum(-1).mean(1)
            for m in [8]:
                sel = (qn * kn).sqrt().topk(m, -1).indices
                score(f"query-aware {m} perq", group_w(part_dims(fc_dims(sel, d, "rotate_half")), hkv, g))
for name, (a, b, c) in sorted(res.items(), key=lambda x: -x[1][1]):
    print(f"{name:32s} recall {a/c:.3f} mass {b/c:.3f}")
