"""Quest's pass-key misses, diagnosed: the same grid with an oracle page score.

    .venv/bin/python docs/results/quest/oracle.py [--threads 2]

Runs docs/results/quest/passkey-4k.json's samples (pass key at 4096 tokens, 9 depths) with Quest at
its defaults (1024 tokens = 64 pages of 16, first 2 layers dense) except that each page is scored by
the *exact* maximum of q·k over its keys (maximised over the query heads of each KV head, as Quest's
bound is), reading all of K: not Quest, a diagnostic. If the oracle answers like dense, the loss
comes from the looseness of Quest's min/max bound; if it misses too, page-granular selection at
this budget is the limit. Writes oracle.jsonl beside this file (one row per depth).
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import tokensparse as ts
from tokensparse.engine.selection import select_topk
from tokensparse.eval import metrics
from tokensparse.eval.grid import build_grid, load_config
from tokensparse.eval.harness import run_sample
from tokensparse.eval.runner import answer_target
from tokensparse.methods.quest import Quest

HERE = Path(__file__).parent


@dataclass(eq=False)
class QuestExactPages(Quest):
    name = ""  # not registered: a diagnostic

    def select(self, call):
        self._call = call
        return super().select(call)

    def top_pages(self, q, kmin, kmax, k):
        """Pages by the exact max of q·key over their keys (all of K is read)."""
        key = self._call.key
        b, hq, _, d = q.shape
        hkv, n_pages, page = key.shape[1], kmin.shape[2], self.page
        keys = key[:, :, : n_pages * page].float()
        logits = q.float().reshape(b, hkv, hq // hkv, d) @ keys.transpose(-1, -2)
        per_page = logits.amax(2).reshape(b, hkv, n_pages, page).amax(-1)
        top, _ = select_topk(per_page, k)
        return top


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = build_grid(load_config(HERE / "passkey-4k.json"))
    model, tok = ts.load_model()
    out = HERE / "oracle.jsonl"
    with out.open("w") as f:
        for sspec in grid.sample_specs():
            sample = sspec.make(tok)
            teacher = torch.tensor([tok(answer_target(sample), add_special_tokens=False).input_ids])
            r = run_sample(model, tok, sample, QuestExactPages(), teacher_ids=teacher)
            row = {"sample_id": sample.sample_id, "depth": sspec.depth, "method": "quest-exact-pages-oracle",
                   "prediction": r.prediction, "correct": metrics.score(r.prediction, sample.answers, "all") == 1.0,
                   "answer_loglik": r.teacher.loglik if r.teacher is not None else None}
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(row)


if __name__ == "__main__":
    main()
