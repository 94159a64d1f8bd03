#!/bin/bash
# Decode speed of the default candidates (Landmark block size, TidalDecode selection layers), run alone
# on the machine: 1 timed thread (the prefill that fills the cache uses 2, untimed)
set -e
cd "$(dirname "$0")/../../.."
D=docs/results/decode_defaults
.venv/bin/tokensparse bench decode --lengths 8192 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --variants $D/variants-8k.json --json $D/decode-8k.json > $D/decode-8k.txt
.venv/bin/tokensparse bench decode --lengths 2048,32768 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --variants $D/variants-32k.json --json $D/decode-32k.json > $D/decode-32k.txt
