#!/usr/bin/env bash
# Reproduces every number in docs/results/README.md on the bundled SmolLM2-135M-Instruct (fp32, CPU).
# Run from the repository root after `make install`. Takes ~45 minutes on the 2-core machine.
set -euo pipefail
TS=.venv/bin/tokensparse
OUT=docs/results
# accuracy: pass key at ~4K tokens, 6 depths, dense vs every configuration, 2 threads
$TS demo --length 4096 --depths 6 --placement both --extended --threads 2 --json $OUT/passkey_4k.json | tee $OUT/passkey_4k.txt
# speed: 1 thread (steadiest on this shared 2-core box), ratios against dense from the same process
$TS bench attention --lengths 8192 --repeats 3 --threads 1 --json $OUT/attention_8k.json | tee $OUT/attention_8k.txt
$TS bench prefill --lengths 8192 --repeats 2 --threads 1 --json $OUT/prefill_8k.json | tee $OUT/prefill_8k.txt
$TS bench decode --lengths 8192,16384,32768 --repeats 2 --steps 24 --threads 1 --json $OUT/decode.json | tee $OUT/decode.txt
# executors alone on random tensors shaped like SmolLM2's attention (no model), same thread count
$TS bench executors --lengths 2048,4096,8192 --densities 0.1,0.25,0.5 --repeats 5 --threads 1 --json $OUT/executors.json | tee $OUT/executors.txt
