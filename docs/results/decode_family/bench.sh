#!/bin/bash
# Issue 11's decode benchmarks, run alone on the machine (1 thread; the prefill that fills the cache uses 2)
set -e
cd "$(dirname "$0")/../../.."
.venv/bin/tokensparse bench decode --lengths 8192 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --variants docs/results/decode_family/variants-8k.json --json docs/results/decode_family/decode-8k.json \
  > docs/results/decode_family/decode-8k.txt
.venv/bin/tokensparse bench decode --lengths 2048,16384,32768 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --variants docs/results/decode_family/variants-long.json --json docs/results/decode_family/decode-long.json \
  > docs/results/decode_family/decode-long.txt
