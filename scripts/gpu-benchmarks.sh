#!/bin/bash
# The GPU benchmarks of docs/benchmarks.md in one call on the lent 4-GPU machine (run from the
# project root, with requirements/cuda13.txt installed or its offline bundle carried as .gpu-bundle):
#
#   bash scripts/gpu-benchmarks.sh [serve] [serve-eager] [recovery] [recovery2]
#                                   (serve and recovery when none is named)
#
# serve:    Qwen3-30B-A3B-sized random weights, all 48 layers, bf16: `eep bench serve`
#           (symm elastic vs checks off vs nccl) with decode steps replayed from CUDA graphs
#           (the default on GPUs; the nccl fabric runs the same padded steps eagerly), after
#           the GPU test of the replayed steps (tests/eep/test_decode_graph_gpu.py).
# serve-eager: the same with --no-cuda-graphs (every step launched eagerly).
# recovery: the same shapes with RECOVERY_LAYERS layers (default 16) in fp32, so greedy outputs
#           can be compared token for token with the single-process reference on one GPU;
#           `eep bench recovery` (elastic, then the full-restart baseline; RECOVERY_MODES=elastic
#           for the elastic run only) in its capacity mode: the capacity measured first, then an
#           open-loop load at 0.9 of it (4 slots); RECOVERY_REPEAT (default 1) runs per mode.
# recovery2: the same with two slots killed 1 s apart (within one TTL).
# SLOTS (default 4) sets the EP width of every job: 8 on an 8-GPU machine.
# Results go to $OUT (default ./gpu-out): JSON, PNG, and the clusters' logs as one tarball.
# The device tool allows 10 minutes a command: run one job per call (each writes its weights
# first, about 1 minute for 48 layers, since a machine does not outlive its idle release).
set -u
source .gpu-bundle/setup.sh >/dev/null 2>&1
# this checkout installed editable into python3 (skipped when it already is): the same as
# `make gpu-install`
python3 -c 'import os, eep.membership as m; r = os.path.realpath; raise SystemExit(not r(m.__file__).startswith(r(os.curdir) + os.sep))' 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
OUT=${OUT:-gpu-out}
WEIGHTS=${WEIGHTS:-/dev/shm/eep-q30b}
LAYERS=${RECOVERY_LAYERS:-16}
SLOTS=${SLOTS:-4}
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo "== +$(($(date +%s) - t0)) s: $*"; }
cli() { python3 -m eep.tools.cli "$@"; }
jobs_="${*:-serve recovery}"

serve() {  # $1: name, then extra arguments of the bench
    local name=$1
    shift
    step "weights: 48 layers, bf16"
    [ -f "$WEIGHTS/config.json" ] || cli make-weights --config qwen3-30b-a3b --out "$WEIGHTS" \
        --dtype bf16 2>&1 | tail -1
    step "bench serve ($name)"
    cli bench serve --device cuda --model "$WEIGHTS" --slots "$SLOTS" --experts-per-slot $((160 / SLOTS)) \
        --batch 32 --prompt-len 16 --gen-len 32 --rounds 5 --max-tokens-per-step 128 "$@" \
        --out "$OUT/$name.json" 2>&1 | grep -v '^\[rank' | tail -12
}
if [[ " $jobs_ " == *" serve "* ]]; then
    step "GPU test: replayed decode steps"
    python3 -m pytest -q -m gpu tests/eep/test_decode_graph_gpu.py 2>&1 | tail -3
    serve serve
fi
[[ " $jobs_ " == *" serve-eager "* ]] && serve serve-eager --no-cuda-graphs

recovery() {  # $1: name, then extra arguments of the bench
    local name=$1 R="$WEIGHTS-$LAYERS"
    shift
    step "weights: $LAYERS layers, bf16 on disk, served in fp32"
    [ -f "$R/config.json" ] || cli make-weights --config qwen3-30b-a3b --layers "$LAYERS" \
        --out "$R" --dtype bf16 2>&1 | tail -1
    step "bench recovery ($name)"
    rm -rf /tmp/eep-recovery-logs
    cli bench recovery --device cuda --model "$R" --dtype float32 --slots "$SLOTS" \
        --modes "${RECOVERY_MODES:-elastic,baseline}" --repeat "${RECOVERY_REPEAT:-1}" "$@" \
        --log-dir /tmp/eep-recovery-logs --out "$OUT/$name.json" --plot "$OUT/$name.png" 2>&1 |
        grep -v '^\[rank' | tail -90
    # the logs, trimmed, in one file (the device tool returns a limited number of files)
    rm -rf /tmp/eep-logs && mkdir -p /tmp/eep-logs
    for run in /tmp/eep-recovery-logs/*/run*; do  # <mode>/run<i>
        [ -d "$run" ] || continue
        dst="/tmp/eep-logs/${run#/tmp/eep-recovery-logs/}"
        mkdir -p "$dst"
        for f in "$run"/*.log "$run"/*.jsonl; do
            [ -f "$f" ] && tail -c 200000 "$f" >"$dst/$(basename "$f")"
        done
    done
    tar czf "$OUT/$name-logs.tgz" -C /tmp/eep-logs .
}
[[ " $jobs_ " == *" recovery "* ]] && recovery recovery
[[ " $jobs_ " == *" recovery2 "* ]] && recovery recovery2 --slot 1,2 --stagger 1
step done
