#!/bin/bash
# Decode speed of Landmark's one- and two-level block search at 8K and 32K (YaRN x4), run alone on
# the machine: 1 timed thread (the prefill that fills the cache uses 2, untimed)
set -e
cd "$(dirname "$0")/../../.."
D=docs/results/landmark_two_level
# 1. each round builds the methods' cache state (block means) in its first timed step (the
#    default of bench decode); its 8K rows ran next to the end of an evaluation: not used, the 8K
#    rows come from the second command, run alone right after
.venv/bin/tokensparse bench decode --lengths 8192,32768 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --variants $D/variants.json --json $D/decode.json > $D/decode.txt
.venv/bin/tokensparse bench decode --lengths 8192 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --variants $D/variants.json --json $D/decode-8k.json > $D/decode-8k.txt
# 2. steady state: the state is built once in an untimed step (--warm-state), alone; FASA and the
#    int8 Quest bound (whose cache state is a key copy / shadow) added
.venv/bin/tokensparse bench decode --lengths 8192,32768 --threads 1 --repeats 3 --steps 16 --no-dynamic \
  --warm-state --variants $D/variants-warm.json --json $D/decode-warm.json > $D/decode-warm.txt
# 3. the int8 Quest bound after the change to the fp32 product on AVX2 CPUs (engine/shadow.py: CPU_INT_MM)
.venv/bin/tokensparse bench decode --lengths 8192 --threads 1 --repeats 3 --steps 16 --no-dynamic --warm-state \
  --variants $D/variants-quest-int8.json --json $D/decode-quest-int8-8k.json > $D/decode-quest-int8-8k.txt
