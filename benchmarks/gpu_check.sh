#!/usr/bin/env bash
# The GPU proof: one call on the lent GPU machine (one H200, Python 3.12, torch 2.11 + CUDA 13, triton
# 3.6; no DeepSpeed, lmdb, pytest, MLflow, DALI; nothing downloadable there), under 8 minutes.
#
#   bash benchmarks/gpu_vendor.sh           # here, once: a DeepSpeed wheel + missing wheels → .gpu_vendor/
#   bash benchmarks/gpu_check.sh            # there, with .gpu_vendor carried along (README, Benchmarks)
#   bash benchmarks/gpu_check.sh --list     # the stages and their time limits
#   ALLOW_CPU=1 SIZE=tiny bash benchmarks/gpu_check.sh    # the CPU rehearsal of the same plumbing
#
# Stages, each under its own time limit (they sum to well under the 600 s a call may run, and a global
# DEADLINE shortens the last ones if earlier ones ran long, so the summary always prints):
#   install          DeepSpeed's wheel (built by gpu_vendor.sh) + missing wheels from .gpu_vendor/ (pip --no-index,
#                    DeepSpeed seeing CUDA, no nvcc; a --dry-run where all is installed), mcf itself with
#                    --no-deps -e (so mcf.kernels maps to kernels/); every module the stages need imports
#   pretrain         `mcf pretrain`, ViT-B/16, bf16, ZeRO-1, torch loader on synthetic JPEGs, random
#                    teacher, STEPS steps; losses finite; EMA = m·target + (1−m)·online from the fp32
#                    masters between the last two checkpoints
#   resume           RESUME_STEPS more steps from pretrain's last checkpoint (resume auto), one profiled
#   bench_step       `mcf bench step` (paper vs mcf: images/s, MFU)
#   profile          torch.profiler of one resume step: shares of mcf.target/teacher/ema/sync/...
#   kernels          the Triton kernel tests compiled for the GPU against their references
#   compile          the same with train.compile=true, TORCH_LOGS=recompiles,graph_breaks (counted)
#   triton_range     attention.backend=triton + masking.ratio_range (compiled unless RANGE_COMPILE=0)
#   bench_attention  `mcf bench attention --full`: Triton vs SDPA vs math; the TRITON_FASTER rows to paste
#   loader           `mcf bench data`: torch loader images/s at 2 vs 12 workers (DALI is not there)
# Out ($OUT, else benchmarks/out/): gpu_check.json (every stage: status, seconds, limit, result),
# gpu_check.log, gpu_check_stages.tar.gz (each stage's log and JSON). gpu_check.json is rewritten after every
# stage; a stage that fails or runs out of time reports what it measured before ("partial": steps logged, loss,
# images/s, complete checkpoints; kernel tests passed so far). Exit status: stages not passed.
#
# Knobs (environment): STAGES (subset, in order), SIZE=gpu|tiny, MODEL CONFIG BATCH STEPS RESUME_STEPS
# COMPILE_STEPS RANGE_STEPS IMG PRECISION ZERO ATTN_BACKEND RANGE RANGE_COMPILE KERNEL_TESTS ATTN_ARGS
# BENCH_ARGS LOADER_WORKERS LOADER_COUNT LOADER_IMG LOADER_BATCH LOADER_BATCHES DEADLINE LIMIT_SCALE CACHE CLEAN_CACHE
# LIMITS (name:s ...) VENDOR WORK PYTHON, COMMIT (recorded when the copy there has no .git).
# SIZE=tiny (with ALLOW_CPU=1 on a machine without CUDA) runs every stage at toy sizes: a rehearsal
# of this script, not a GPU figure.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# name:limit in seconds, in run order: the figures that matter most first (a pretrain, its resume, the step
# benchmark, the profile of a resumed step), then the compile-heavy stages (the kernel tests JIT-compile ~50
# variants; compile and triton_range reuse their Triton/Inductor caches, CACHE below); the limits sum to 465 s
STAGE_LIMITS=(install:50 pretrain:80 resume:45 bench_step:30 profile:5 kernels:85 compile:65 triton_range:45
              bench_attention:30 loader:30)
DEADLINE_DEFAULT=470    # whole script, seconds: the device tool allows 600 per call
RESERVE=15              # kept for the summary and `timeout --kill-after`

PY=$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")  # absolute: the install runs with nvcc folders off PATH
OUT=${OUT:-benchmarks/out}
WORK=${WORK:-/tmp/mcf_gpu_check}
VENDOR=${VENDOR:-.gpu_vendor}
SIZE=${SIZE:-gpu}
if [ "$SIZE" = tiny ]; then
    : "${CONFIG:=demo}" "${MODEL:=mcf_vit_tiny}" "${BATCH:=8}" "${STEPS:=6}" "${RESUME_STEPS:=3}" "${COMPILE_STEPS:=3}"
    : "${RANGE_STEPS:=3}" "${ATTN_ARGS:=--tiny}" "${LOADER_COUNT:=256}" "${LOADER_IMG:=64}" "${LOADER_BATCH:=32}"
    : "${LOADER_BATCHES:=4}" "${DATA_SIZE:=64}" "${LIMIT_SCALE:=12}"   # a loaded 2-core CPU compiles slowly
    : "${BENCH_ARGS:=--steps 1 --repeats 2 --warmup 1}"
fi
CONFIG=${CONFIG:-base}
MODEL=${MODEL:-mcf_vit_base_patch16}
IMG=${IMG:-}
BATCH=${BATCH:-64}
STEPS=${STEPS:-30}
RESUME_STEPS=${RESUME_STEPS:-5}
COMPILE_STEPS=${COMPILE_STEPS:-10}
RANGE_STEPS=${RANGE_STEPS:-10}
PRECISION=${PRECISION:-bf16}
ZERO=${ZERO:-1}
# default: triton on a GPU; sdpa on a CPU (triton 3.6's interpreter fails with numpy >= 2.4)
ATTN_BACKEND=${ATTN_BACKEND:-}
RANGE=${RANGE:-[0.6,0.9]}
RANGE_COMPILE=${RANGE_COMPILE:-1}
DATA_COUNT=${DATA_COUNT:-512}
DATA_SIZE=${DATA_SIZE:-256}
ATTN_ARGS=${ATTN_ARGS:---full --repeats 10}
BENCH_ARGS=${BENCH_ARGS:---steps 5 --repeats 3 --warmup 3}
LOADER_WORKERS=${LOADER_WORKERS:-2 12}
LOADER_COUNT=${LOADER_COUNT:-4096}
LOADER_IMG=${LOADER_IMG:-224}
LOADER_BATCH=${LOADER_BATCH:-256}
LOADER_BATCHES=${LOADER_BATCHES:-8}
LIMIT_SCALE=${LIMIT_SCALE:-1}
DEADLINE=${DEADLINE:-$(( DEADLINE_DEFAULT * LIMIT_SCALE ))}
PROFILE_STEP=$(( STEPS + (RESUME_STEPS > 3 ? 3 : RESUME_STEPS) ))   # a resumed step past the first two

export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
# compile caches in CACHE, a folder of this script's own that outlives WORK: every stage, and a second call on the
# same (warm) machine, reuses the Triton kernels, Inductor graphs and DeepSpeed ops compiled before. CLEAN_CACHE=1
# empties it first (a truncated entry left by a killed process once broke a rehearsal's Inductor load).
CACHE=${CACHE:-/tmp/mcf_gpu_check_cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$CACHE/torch_extensions}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$CACHE/inductor_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$CACHE/triton_cache}

stage_names() { local e; for e in "${STAGE_LIMITS[@]}"; do echo "${e%%:*}"; done; }
stage_limit() {  # NAME → seconds: LIMITS (name:s ...) overrides the table; the table's are scaled by LIMIT_SCALE
    local e
    for e in ${LIMITS:-}; do [ "${e%%:*}" = "$1" ] && { echo "${e##*:}"; return; }; done
    for e in "${STAGE_LIMITS[@]}"; do [ "${e%%:*}" = "$1" ] && echo $(( ${e##*:} * LIMIT_SCALE )); done
}
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$OUT/gpu_check.log" >&2; }
check() { "$PY" benchmarks/gpu_check.py "$@"; }

# -- the stages (each runs as `gpu_check.sh __stage NAME` under `timeout`; stdout+stderr → WORK/NAME.log) --
pretrain_cmd() {  # OUTPUT_DIR MAX_STEPS [extra mcf pretrain args]
    local dir=$1 steps=$2; shift 2
    "$PY" -m mcf pretrain --config "$CONFIG" --model "$MODEL" --data "$WORK/data/images" --loader torch \
        --teacher-checkpoint random --precision "$PRECISION" --zero "$ZERO" --batch-size "$BATCH" --max-steps "$steps" \
        --log-every 1 --tracking-uri none --output-dir "$dir" --set logging.progress=false --set logging.recon_every=0 \
        ${IMG:+--set model.img_size=$IMG} "$@"
}

need_data() {
    [ -d "$WORK/data/images" ] ||
        "$PY" -c "from mcf.bench.feeds import make_jpeg_folder; make_jpeg_folder('$WORK/data', $DATA_COUNT, $DATA_SIZE)"
}

without_nvcc() {  # PATH without the folders that hold an nvcc (the GPU machine has no CUDA toolkit)
    local d out=""
    IFS=: read -r -a dirs <<< "$PATH"
    for d in "${dirs[@]}"; do [ -x "$d/nvcc" ] || out="${out:+$out:}$d"; done
    echo "$out"
}

st_install() {
    # DeepSpeed comes as the wheel gpu_vendor.sh built (setup.py must not run there: on a CUDA machine it
    # requires nvidia-ml-py and, without nvcc, fails in builder.is_compatible()). The install runs as it
    # will there: DeepSpeed's accelerator detection sees CUDA (forced in the CPU rehearsal), no nvcc on
    # PATH, no CUDA_HOME, pip's own config ignored (only the vendor folder). Where everything already
    # imports (a rehearsal host), the same command runs with --dry-run: the resolution is what is tested.
    local wheel dry=() have=0
    "$PY" -c "import deepspeed, lmdb, pytest, pytest_timeout" 2>/dev/null && have=1
    if [ ! -d "$VENDOR" ]; then
        [ "$have" = 1 ] && { echo "everything imports; no $VENDOR/ to rehearse the vendored install with"; } ||
            { echo "DeepSpeed/lmdb/pytest missing and no $VENDOR/:" \
                   "run benchmarks/gpu_vendor.sh where pip works, and carry $VENDOR"; return 1; }
    else
        wheel=$(ls "$VENDOR"/deepspeed-*-py3-none-any.whl 2>/dev/null | head -n 1)
        [ -n "$wheel" ] || { echo "no DeepSpeed wheel in $VENDOR/ (rerun benchmarks/gpu_vendor.sh)"; return 1; }
        [ "$have" = 1 ] && dry=(--dry-run)
        echo "pip install ${dry[*]} $wheel lmdb pytest pytest-timeout (DS_ACCELERATOR=cuda, no nvcc)"
        # shellcheck disable=SC2097,SC2098  # PATH is the stripped one for pip only
        env -u CUDA_HOME -u CUDA_PATH -u DS_BUILD_OPS PATH="$(without_nvcc)" DS_ACCELERATOR=cuda PIP_CONFIG_FILE=/dev/null \
            "$PY" -m pip install "${dry[@]}" --no-index --find-links "$VENDOR" --no-build-isolation --no-cache-dir \
            --progress-bar off "$wheel" lmdb pytest pytest-timeout || return 1
    fi
    local here="import mcf.kernels, pathlib as p, sys
sys.exit(p.Path(mcf.kernels.__file__).resolve().parent != p.Path('kernels').resolve())"
    if ! "$PY" -c "$here" 2>/dev/null; then  # mcf.kernels is not this tree's kernels/
        # editable and without dependencies (MLflow, DALI are not there): mcf.kernels then maps to kernels/
        "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --progress-bar off -e . ||
            return 1
    fi
    check imports . > "$WORK/install.json"
}

st_kernels() {
    local tests
    if [ "$HAS_CUDA" = 1 ]; then
        export TRITON_INTERPRET=0 MCF_TEST_GPU=1
        tests=${KERNEL_TESTS:-tests/test_kernels_attention.py tests/test_kernels_decoder_input.py
               tests/test_kernels_dispatch.py tests/test_kernels_cuda_compile.py}
    else  # the interpreter of triton <= 3.6 fails with numpy >= 2.4 (the GPU image's pair): compile-only here
        tests=${KERNEL_TESTS:-tests/test_kernels_dispatch.py tests/test_kernels_cuda_compile.py}
    fi
    # shellcheck disable=SC2086  # a list of test files
    "$PY" -m pytest -q -p no:cacheprovider --timeout 300 --junitxml "$WORK/kernels.xml" $tests
    check junit "$WORK/kernels.xml" > "$WORK/kernels.json"
}

st_pretrain() {
    need_data || return 1
    pretrain_cmd "$WORK/pretrain" "$STEPS" --resume none --checkpoint-every $(( STEPS - 1 )) \
        --set checkpoint.keep_last=3 || return 1
    check run "$WORK/pretrain" --steps "1-$STEPS" --ema "$(( STEPS - 1 )),$STEPS" > "$WORK/pretrain.json"
}

st_resume() {
    if [ ! -f "$WORK/pretrain/checkpoints/step_$(printf %08d "$STEPS")/COMPLETE" ]; then
        echo "needs the pretrain stage's final checkpoint"; return 75
    fi
    local total=$(( STEPS + RESUME_STEPS ))
    pretrain_cmd "$WORK/pretrain" "$total" --resume auto --checkpoint-every $(( STEPS - 1 )) \
        --set checkpoint.keep_last=3 --set logging.profile_step="$PROFILE_STEP" || return 1
    check run "$WORK/pretrain" --steps "$(( STEPS + 1 ))-$total" --resumed-from "$STEPS" --log "$WORK/resume.log" \
        > "$WORK/resume.json"
}

st_compile() {
    need_data || return 1
    TORCH_LOGS=recompiles,graph_breaks pretrain_cmd "$WORK/compile" "$COMPILE_STEPS" --resume none \
        --checkpoint-every 1000000 --set train.compile=true || return 1
    check run "$WORK/compile" --steps "1-$COMPILE_STEPS" --log "$WORK/compile.log" --compile-log > "$WORK/compile.json"
}

st_triton_range() {
    need_data || return 1
    local backend=${ATTN_BACKEND:-$([ "$HAS_CUDA" = 1 ] && echo triton || echo sdpa)}
    echo "attention.backend=$backend masking.ratio_range=$RANGE train.compile=$RANGE_COMPILE"
    local extra=(--set "attention.backend=$backend" --set "masking.ratio_range=$RANGE")
    [ "$RANGE_COMPILE" = 1 ] && extra+=(--set train.compile=true)
    TORCH_LOGS=recompiles,graph_breaks pretrain_cmd "$WORK/triton_range" "$RANGE_STEPS" --resume none \
        --checkpoint-every 1000000 "${extra[@]}" || return 1
    check run "$WORK/triton_range" --steps "1-$RANGE_STEPS" --log "$WORK/triton_range.log" --compile-log \
        > "$WORK/triton_range.json"
}

st_profile() {
    [ -f "$WORK/pretrain/profile_step_$PROFILE_STEP.json" ] || { echo "needs the resume stage's profile"; return 75; }
    check profile "$WORK/pretrain" "$PROFILE_STEP" > "$WORK/profile.json"
}

st_bench_step() {
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    "$PY" -m mcf.bench step --model "$MODEL" --img-size "${IMG:-0}" --batch-size "$BATCH" $BENCH_ARGS \
        --out "$WORK/bench_step.json" > /dev/null
}

st_bench_attention() {
    # shellcheck disable=SC2086  # ATTN_ARGS is a list of flags
    "$PY" -m mcf.bench attention $ATTN_ARGS --out "$WORK/bench_attention.json" > /dev/null
}

st_loader() {
    local w files=()
    for w in $LOADER_WORKERS; do
        "$PY" -m mcf.bench data --sources folder --count "$LOADER_COUNT" --file-size 256 --img-size "$LOADER_IMG" \
            --batch-size "$LOADER_BATCH" --batches "$LOADER_BATCHES" --workers "$w" --out "$WORK/loader_w$w.json" \
            > /dev/null || return 1
        files+=("$WORK/loader_w$w.json")
    done
    check loader "${files[@]}" > "$WORK/loader.json"
}

# -- the runner --------------------------------------------------------------------------------------
run_stage() {  # NAME: runs it under its limit (shortened to the time left), appends a line to WORK/stages.tsv
    local name=$1 limit left status note="" t0 t1 rc
    limit=$(stage_limit "$name")
    left=$(( DEADLINE - $(elapsed) - RESERVE ))
    if [ "$left" -lt 3 ]; then
        printf '%s\tskipped\t0\t0\t%s\tno time left before the deadline (%ss)\n' "$name" "$limit" "$DEADLINE" >> "$WORK/stages.tsv"
        say "-- $name skipped: no time left"; return
    fi
    [ "$limit" -gt "$left" ] && { note="limit cut from $limit s to the $left s left"; limit=$left; }
    say "== $name (limit ${limit}s)"
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" bash "$0" __stage "$name" > "$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    case $rc in
        0) status=pass ;;
        124|137) status=timeout; note="${note:+$note; }ran past ${limit}s" ;;
        75) status=skipped; note="${note:+$note; }$(tail -n 1 "$WORK/$name.log")" ;;
        *) status=fail ;;
    esac
    printf '%s\t%s\t%s\t%.1f\t%s\t%s\n' "$name" "$status" "$rc" "$(awk "BEGIN { print $t1 - $t0 }")" "$limit" "$note" \
        >> "$WORK/stages.tsv"
    say "   $name: $status (exit $rc)"
    [ "$status" = pass ] || tail -n 15 "$WORK/$name.log" | sed 's/^/   | /' | tee -a "$OUT/gpu_check.log" >&2
    # the JSON after every stage: a call cut off later (the device tool's own limit) still has what ran
    check summary "$WORK" "$OUT/gpu_check.json" --quiet > /dev/null 2>&1
}

finish() {
    local rc
    echo "total_s=$(elapsed)" >> "$WORK/meta.txt"
    check summary "$WORK" "$OUT/gpu_check.json" 2>&1 | tee -a "$OUT/gpu_check.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ge 100 ] || [ ! -f "$OUT/gpu_check.json" ]; then  # the summary itself failed: the raw records
        echo "summary failed; stage records:"; cat "$WORK/stages.tsv" 2>/dev/null; rc=100
    fi
    (cd "$WORK" && find . -maxdepth 3 \( -name '*.json' -o -name '*.log' -o -name '*.xml' -o -name '*.tsv' -o -name '*.txt' \
        -o -name '*.jsonl' -o -name '*.yaml' \) -not -path './*_cache/*' -not -path './torch_extensions/*' -print0 \
        | tar czf - --null -T -) > "$OUT/gpu_check_stages.tar.gz" 2>/dev/null
    exit "$rc"
}

main() {
    local s selected
    mkdir -p "$OUT"
    rm -rf "$WORK" && mkdir -p "$WORK"
    [ "${CLEAN_CACHE:-0}" = 1 ] && rm -rf "$CACHE"
    mkdir -p "$CACHE"
    : > "$OUT/gpu_check.log"
    T0=$(date +%s)
    HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
    export HAS_CUDA T0
    selected=${STAGES:-$(stage_names | tr '\n' ' ')}
    {
        echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        local dirty; dirty=$(git status --porcelain 2>/dev/null | grep -q . && echo +dirty)
        echo "commit=${COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$dirty}"
        echo "host=$(hostname) $(nproc) cpus"
        echo "device=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)"
        echo "size=$SIZE model=$MODEL batch=$BATCH steps=$STEPS precision=$PRECISION zero=$ZERO deadline=$DEADLINE"
        echo "stages=$selected"
    } > "$WORK/meta.txt"
    trap finish EXIT
    trap 'exit 130' INT TERM
    say "commit $(sed -n 's/^commit=//p' "$WORK/meta.txt"), cuda=$HAS_CUDA, work $WORK, out $OUT"
    if [ "$HAS_CUDA" != 1 ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
        say "no CUDA device visible: this is the GPU proof (ALLOW_CPU=1 SIZE=tiny rehearses it on a CPU)"
        exit 1
    fi
    [ "$HAS_CUDA" = 1 ] || export DS_ACCELERATOR=cpu
    for s in $selected; do
        [ -n "$(stage_limit "$s")" ] || { say "unknown stage '$s' (see --list)"; exit 2; }
    done
    for s in $selected; do
        run_stage "$s"
    done
}

case "${1:-}" in
    --list)
        total=0
        for e in "${STAGE_LIMITS[@]}"; do printf '%-16s %4ss\n' "${e%%:*}" "${e##*:}"; total=$(( total + ${e##*:} )); done
        printf '%-16s %4ss (deadline %ss, per-call limit 600s)\n' total "$total" "$DEADLINE_DEFAULT" ;;
    __stage)
        "st_$2" ;;
    -h|--help)
        sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//' ;;
    "")
        main ;;
    *)
        echo "gpu_check.sh: unknown argument '$1' (--list, --help)" >&2; exit 2 ;;
esac
