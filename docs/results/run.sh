#!/usr/bin/env bash
# Reproduces the numbers in docs/results/README.md on the bundled SmolLM2-135M-Instruct (fp32, CPU).
# Run from the repository root after `make install` (and `make kvpress-env` for the peer rows).
# Sections can be run alone; each says how long it took on the project's 2-core machine.
set -euo pipefail
TS=.venv/bin/tokensparse
OUT=docs/results

# ---- evaluation v2: the standard suite (about 100 minutes for the tokensparse runs, 2 threads) ----
$TS eval --suite standard --out $OUT/standard --threads 2 --skip-peers
# the kvpress peers on the same samples (2K; resumes into the same results file)
$TS eval --suite standard --out $OUT/standard --threads 2
# why TokenSelect's Selection Cache and SnapKV lose (decode-path traces; ~7 minutes)
.venv/bin/python -m tokensparse.eval.diagnose --out $OUT/diagnosis --tasks long_answer,multikey,needle_uuid --lengths 2048 --samples 3 --threads 2
# decode speed of exactly the suite's TokenSelect configurations (1 thread, interleaved; ~3 minutes)
$TS bench decode --lengths 4096,8192 --repeats 2 --steps 24 --threads 1 --json $OUT/decode_v2.json | tee $OUT/decode_v2.txt
# the report, with the benchmark's speed-ups next to the accuracy of the same configs
$TS report --results $OUT/standard --out $OUT/standard/report --bench $OUT/decode_v2.json

# Engine v2 proof methods (docs/results/engine-v2/): pass key at 4K (TidalDecode 25%, TOVA 50%) and the
# TidalDecode diagnosis; TidalDecode's v2 rows come from the standard suite above
$TS eval --config $OUT/engine-v2/passkey-4k.json --out $OUT/engine-v2 --threads 2
$TS eval --config $OUT/engine-v2/tidal-diagnosis.json --out $OUT/engine-v2 --threads 2

# Engine v2 part 1, block-sparse prefill (docs/results/hip/): HiP pass key at 4K, attention-only speed at 8K
$TS eval --config $OUT/hip/passkey-4k.json --out $OUT/hip --threads 2
$TS bench attention --lengths 8192 --methods hip --threads 1 --repeats 3 --json $OUT/hip/attention_8k.json | tee $OUT/hip/attention_8k.txt

# Engine v2 part 2 (docs/results/quest, adakv, sinks): Quest / H2O pass key and Quest decode speed;
# AdaKV / PyramidKV on the suite's 2K samples against kvpress's AdaKV in the same run; sinks
$TS eval --config $OUT/quest/passkey-4k.json --out $OUT/quest --threads 2
$TS bench decode --lengths 8192 --threads 1 --repeats 3 --json $OUT/quest/decode_8k.json | tee $OUT/quest/decode_8k.txt
$TS eval --config $OUT/adakv/adakv-2k.json --out $OUT/adakv --threads 2
$TS sinks --tokens 2048 --threads 2 --json $OUT/sinks/kjv_2048.json | tee $OUT/sinks/kjv_2048.txt
# decode family (issue 11): pass key 4K, the suite's 2K half, decode speed 8K/2K/16K/32K (docs/results/decode_family.md)
$TS eval --config $OUT/decode_family/passkey-4k.json --out $OUT/decode_family --threads 2
$TS eval --config $OUT/decode_family/standard.json --out $OUT/decode_family --threads 2 --set 'lengths=[2048]'
bash $OUT/decode_family/bench.sh

# ---- the v1 numbers (pass key only; superseded for accuracy claims by the standard suite above) ----
# accuracy: pass key at ~4K tokens, 6 depths, dense vs every configuration, 2 threads
# $TS demo --length 4096 --depths 6 --placement both --extended --threads 2 --json $OUT/passkey_4k.json | tee $OUT/passkey_4k.txt
# $TS eval --suite passkey --out $OUT/passkey-suite --threads 2     # (was `--suite standard` before 2026-12-01)
# speed: 1 thread (steadiest on this shared 2-core box), ratios against dense from the same process
$TS bench attention --lengths 8192 --repeats 3 --threads 1 --json $OUT/attention_8k.json | tee $OUT/attention_8k.txt
$TS bench prefill --lengths 8192 --repeats 2 --threads 1 --json $OUT/prefill_8k.json | tee $OUT/prefill_8k.txt
# executors alone on random tensors shaped like SmolLM2's attention (no model), same thread count
$TS bench executors --lengths 2048,4096,8192 --densities 0.1,0.25,0.5 --repeats 5 --threads 1 --json $OUT/executors.json | tee $OUT/executors.txt
