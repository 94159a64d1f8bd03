#!/usr/bin/env bash
# The GPU lane's measurements in one run (sized for ~9.5 minutes on one H200; see README.md beside
# this). Every step has its own time limit and the run goes on when one fails, so a failure costs
# that step only. Writes into $RES (default docs/results/gpu/h200):
#   log.txt             everything printed, step by step, with the time each step took
#   pytest.xml          tests/test_cuda.py (JUnit; the run is in log.txt) (sync-debug mode "error", no SDPA MATH fallback in bf16,
#                       full budget = dense on CUDA, compiled FlexAttention block executor)
#   decode.json         bench decode: dense (DynamicCache and the engine's cache), TokenSelect and
#                       Quest at budget 2048, SnapKV at 10 % KV; 8K / 32K / 128K
#   prefill_128k.json   bench prefill: dense vs DHSA defaults and BiFormer 1/16 at 128K
#   profile_32k.json    profile_decode.py: host vs device time of one decode step at 32K
#   executors.json      bench executors: 8K / 32K at 5 % and 10 % of the keys
#   decode_static.json  bench decode --static reduce-overhead: static-shape dense, TokenSelect 2048 and
#                       Quest 2048 compiled with CUDA graphs, next to the engine's, at 128K (needs an
#                       H200's memory: weights, the engine's cache and its copy, the static snapshot
#                       and three working caches; ~6 compiles)
# On the lent machine (transformers 5.24 carried as a wheel in .whl/, as ../shared/notes/gpu-h200.md says):
#   RES=$OUT bash docs/results/gpu/run_h200.sh
# ONLY="decode prefill" runs those steps alone; DECODE_LENGTHS=32768,131072 changes the decode lengths.
# Elsewhere, with a CUDA GPU and `make install`: PY=.venv/bin/python bash docs/results/gpu/run_h200.sh
set -u
RES=${RES:-docs/results/gpu/h200}
PY=${PY:-python3}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
LOG="$RES/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
TS="$PY -m tokensparse.cli"
COMMON="--device cuda --dtype bf16 --model-config llama-3.1-8b"
ONLY=${ONLY:-"pytest static decode prefill profile executors"}  # the steps to run
DECODE_LENGTHS=${DECODE_LENGTHS:-8192,32768,131072}
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log it, never stop the run
    local name=$1 limit=$2; shift 2
    case " $ONLY " in *" $name "*) ;; *) return ;; esac
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}
{ nvidia-smi; $PY -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$LOG"

cat > /tmp/gpu_decode_variants.json <<'EOF'
[
 {"label": "token_select 2048", "method": "token_select", "config": {"budget": 2048, "n_sink": 128, "n_local": 256}},
 {"label": "quest 2048", "method": "quest", "config": {"budget": 2048}},
 {"label": "snapkv 10%", "method": "snapkv", "config": {"budget": 0.1}}
]
EOF
cat > /tmp/gpu_static_variants.json <<'EOF'
[
 {"label": "token_select 2048", "method": "token_select", "config": {"budget": 2048, "n_sink": 128, "n_local": 256}},
 {"label": "quest 2048", "method": "quest", "config": {"budget": 2048}}
]
EOF
cat > /tmp/gpu_prefill_variants.json <<'EOF'
[
 {"label": "dhsa (defaults)", "method": "dhsa", "config": {}},
 {"label": "biformer 1/16", "method": "biformer", "config": {"budget": 0.0625}}
]
EOF

step pytest 100 $PY -m pytest -p no:cacheprovider -q -rfE tests/test_cuda.py -o console_output_style=classic \
    --junit-xml=/tmp/junit.xml
cp /tmp/junit.xml "$RES/pytest.xml" 2>/dev/null
step static 300 $TS bench decode $COMMON --lengths ${STATIC_LENGTHS:-131072} --variants /tmp/gpu_static_variants.json \
    --no-dynamic --static reduce-overhead --repeats 2 --steps 16 --json "$RES/decode_static.json"
step decode 170 $TS bench decode $COMMON --lengths $DECODE_LENGTHS --variants /tmp/gpu_decode_variants.json \
    --repeats 2 --steps 16 --json "$RES/decode.json"
step prefill 200 $TS bench prefill $COMMON --lengths 131072 --variants /tmp/gpu_prefill_variants.json \
    --repeats 2 --json "$RES/prefill_128k.json"
step profile 45 $PY docs/results/gpu/profile_decode.py --device cuda --model-config llama-3.1-8b --length 32768 \
    --steps 8 --json "$RES/profile_32k.json"
step executors 35 $TS bench executors $COMMON --lengths 8192,32768 --densities 0.05,0.1 --repeats 3 \
    --json "$RES/executors.json"
echo "=== done" | tee -a "$LOG"
