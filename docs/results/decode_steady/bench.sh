#!/bin/bash
# Steady-state decode speed of the decode family at 8K and 32K (YaRN x4), run alone on the machine:
# 1 timed thread (the prefill that fills the cache uses 2, untimed); --warm-state builds each
# method's cache state (page summaries, int8 shadow, FASA's key copy) once, untimed
set -e
cd "$(dirname "$0")/../../.."
D=docs/results/decode_steady
.venv/bin/tokensparse bench decode --lengths 8192,32768 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --warm-state --variants $D/variants.json --json $D/decode.json > $D/decode.txt
