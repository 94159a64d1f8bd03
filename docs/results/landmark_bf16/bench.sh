#!/bin/bash
# Decode speed of Landmark with bfloat16 block means (summary_dtype) against fp32 at 8K and 32K
# (YaRN x4), steady state (--warm-state), run alone: 1 timed thread (the cache fill uses 2, untimed)
set -e
cd "$(dirname "$0")/../../.."
D=docs/results/landmark_bf16
.venv/bin/tokensparse bench decode --lengths 8192,32768 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --warm-state --variants $D/variants.json --json $D/decode.json > $D/decode.txt
