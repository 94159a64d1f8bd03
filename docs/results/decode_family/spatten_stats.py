"""SpAtten's counters per configuration of a results file (summed over its samples): the share of
real keys the decode steps read (density, every layer), the progressive-quantisation re-fetch rate
(query-head rows, and KV-head rows that fetched full-precision keys), the share of head rows skipped.
``.venv/bin/python docs/results/decode_family/spatten_stats.py FILE.jsonl``"""

import collections
import json
import sys

from summarize import label


def main(path):
    sums = collections.defaultdict(collections.Counter)
    for r in (json.loads(line) for line in open(path)):
        if r["method"] == "spatten" and "error" not in r:
            sums[label(r)].update({k: v for k, v in r["stats"].items() if k.startswith("spatten_")})

    def share(a, b, pct=False):
        return "—" if not b else f"{100 * a / b:.2f}%" if pct else f"{a / b:.3f}"

    print(f"{'configuration':<100} density  re-fetch (rows)  re-fetch (KV rows)  heads skipped")
    for name, c in sums.items():
        kv_rows = c["spatten_head_rows"] // 3 if c["spatten_quant_rows"] else 0  # SmolLM2: 9 query heads, 3 KV heads
        print(f"{name:<100} {share(c['spatten_read_keys'], c['spatten_keys']):>7}  "
              f"{share(c['spatten_refetch_rows'], c['spatten_quant_rows'], True):>15}  "
              f"{share(c['spatten_refetch_kv'], kv_rows, True):>18}  "
              f"{share(c['spatten_head_rows_skipped'], c['spatten_head_rows']):>13}")


if __name__ == "__main__":
    main(sys.argv[1])
