#!/usr/bin/env bash
# One-call GPU check for a single H100/H200 machine (torch, timm, triton preinstalled): about 10 min.
#
#   bash benchmarks/gpu_check.sh            # JSON + logs into $OUT when set, else benchmarks/out/
#   BATCH=128 STEPS=5 bash benchmarks/gpu_check.sh
#
# 1. Triton kernel correctness on the GPU against the reference (pytest, MCF_TEST_GPU=1, no interpreter)
# 2. mcf bench step  — paper vs mcf step, ViT-B/16 + ViT-B/16 teacher, 224 px, bf16, compute only
# 3. mcf bench e2e   — the same with JPEG files through each variant's loader
# 4. mcf bench data  — mcf's DALI vs PyTorch loader (DALI is too big to carry: its absence is reported
#                      and the PyTorch loader runs), and the release's PIL DataLoader
# 5. mcf bench attention --full — Triton vs SDPA vs math at MCF's shapes
# 6. (if time is left) mcf bench step --compile
# Each stage has its own timeout; a failing stage is logged and the next one still runs. The exit
# status is the number of failed stages. The last lines printed are a summary table.
#
# Optional, carried with the working tree (nothing outside the machine can be reached):
#   DEEPSPEED_SDIST=path/deepspeed-X.tar.gz, or one under .vendor/ or shared/ (only `mcf bench scale`
#   and the trainer need DeepSpeed; installed with pip --no-build-isolation --no-deps when missing);
#   .vendor/wheels/ with wheels for missing pure-Python dependencies (lmdb, pyyaml, safetensors ...).
# Knobs (environment): MODEL IMG BATCH STEPS REPEATS WORKERS DATA_COUNT DATA_IMG DATA_BATCH DATA_BATCHES
#   ATTN_ARGS KERNEL_TESTS=0 COMPILE=0; ALLOW_CPU=1 runs the plumbing on a CPU at tiny sizes (a smoke test
#   of this script, not a GPU figure).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
MODEL="${MODEL:-mcf_vit_base_patch16}"
IMG="${IMG:-224}"
BATCH="${BATCH:-128}"
STEPS="${STEPS:-5}"
REPEATS="${REPEATS:-3}"
WORKERS="${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 4 : 2 ))}"
LOG="$OUT/gpu_check.log"
FAILED=0
T0=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0 MCF_TEST_GPU=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"

say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  say "== $name (timeout ${limit}s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.stdout" 2>>"$LOG"
  local rc=$?
  if [ $rc -ne 0 ]; then FAILED=$((FAILED + 1)); say "!! $name failed (exit $rc)"; tail -n 20 "$OUT/$name.stdout" | tee -a "$LOG"; fi
  return $rc
}

: >"$LOG"
say "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown), out $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv 2>&1 | tee -a "$LOG"
$PY - <<'PY' 2>&1 | tee -a "$LOG"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("timm", "triton", "deepspeed", "nvidia.dali", "lmdb", "yaml", "safetensors", "PIL", "torchvision"):
    try:
        mod = importlib.import_module(m); print(f"  {m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m}: MISSING ({type(e).__name__}: {e})")
PY
if [ "${ALLOW_CPU:-0}" != 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible: this script is for a GPU machine"; exit 1
fi

# -- dependencies that may be missing (offline) -------------------------------------------------------
if [ -d .vendor/wheels ]; then
  for mod_pkg in lmdb:lmdb yaml:pyyaml safetensors:safetensors; do
    mod=${mod_pkg%%:*}; pkg=${mod_pkg##*:}
    $PY -c "import $mod" 2>/dev/null || { say "installing $pkg from .vendor/wheels"; $PY -m pip install -q --no-index --find-links .vendor/wheels "$pkg" >>"$LOG" 2>&1; }
  done
fi
if ! $PY -c "import deepspeed" 2>/dev/null; then
  SDIST="${DEEPSPEED_SDIST:-$(ls .vendor/deepspeed-*.tar.gz shared/deepspeed-*.tar.gz 2>/dev/null | head -n 1)}"
  if [ -n "$SDIST" ] && [ -f "$SDIST" ]; then
    say "installing DeepSpeed from $SDIST"
    DS_BUILD_OPS=0 $PY -m pip install -q --no-build-isolation --no-deps "$SDIST" >>"$LOG" 2>&1 || say "DeepSpeed install failed (only bench scale and the trainer need it)"
  else
    say "DeepSpeed missing and no sdist found (set DEEPSPEED_SDIST): not needed by the stages below"
  fi
fi
if $PY -c "import nvidia.dali" 2>/dev/null; then
  LOADER_NOTE="DALI present: mcf's e2e/data rows use DALI (mixed decode)"
else
  LOADER_NOTE="DALI NOT installed here (its wheel is too big to carry): mcf's PyTorch loader runs in e2e; DALI rows are skipped in bench data"
fi
say "$LOADER_NOTE"

# -- 1. kernel correctness ----------------------------------------------------------------------------
KTESTS=$(ls tests/test_kernels_*.py 2>/dev/null | grep -v bench)
if [ "${KERNEL_TESTS:-1}" != 1 ]; then
  say "kernel tests skipped (KERNEL_TESTS=${KERNEL_TESTS:-})"
elif [ -n "$KTESTS" ]; then
  stage kernel_tests 180 $PY -m pytest -q -x -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml" $KTESTS
else
  say "no kernel tests found"
fi

# -- 2-5. benchmarks ----------------------------------------------------------------------------------
B="$PY -m mcf.bench"
SIZE="--model $MODEL --img-size $IMG --batch-size $BATCH --steps $STEPS --repeats $REPEATS --warmup 3"
stage step 150 $B step $SIZE --profile --out "$OUT/step.json"
stage e2e 180 $B e2e $SIZE --workers "$WORKERS" --out "$OUT/e2e.json"
stage data 150 $B data --count "${DATA_COUNT:-4096}" --file-size 256 --img-size "${DATA_IMG:-224}" --batch-size "${DATA_BATCH:-256}" --batches "${DATA_BATCHES:-12}" --workers "$WORKERS" --out "$OUT/data.json"
stage attention 180 $B attention ${ATTN_ARGS:---full} --out "$OUT/attention.json"
if [ "${COMPILE:-1}" = 1 ] && [ $(( $(date +%s) - T0 )) -lt 420 ]; then
  stage step_compile 150 $B step $SIZE --compile --variants mcf --out "$OUT/step_compile.json"
else
  say "skipping step --compile (time)"
fi

# -- summary ------------------------------------------------------------------------------------------
$PY - "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
print("\n=== summary ===")
for name in ("step", "e2e", "step_compile"):
    r = load(name)
    if not r:
        print(f"{name}: no result"); continue
    print(f"{name}: {r['device']} {r['model']} {r['img_size']}px batch {r['batch_size']} (peak {r['peak_flops_reference']/1e12:.0f} TFLOP/s)")
    for v in ("paper", "mcf"):
        x = r.get(v)
        if x:
            print(f"  {v:5s} {x['images_per_s']:9.1f} img/s {x['ms_per_step']:8.1f} ms/step  MFU {x['mfu']*100:5.1f}%  "
                  f"peak mem {x['peak_memory_bytes']/2**30:5.1f} GiB  {x['precision']}  {x.get('loader', x.get('feed', ''))}")
    if r.get("ratio"):
        print(f"  ratio mcf/paper {r['ratio']:.2f}")
d = load("data")
if d:
    print(f"data: {d['files']} files, dali_available={d['dali_available']}")
    for row in d["results"]:
        v = row.get("images_per_s")
        print(f"  {row['source']:6s} {row['loader']:9s} " + (f"{v:9.1f} img/s" if v else row.get("skipped") or row.get("error", "")))
a = load("attention")
if a:
    print(f"attention: {len(a.get('results', []))} rows, triton faster at {len(a.get('triton_faster', []))} shapes")
PY
say "done: $FAILED failed stage(s); outputs in $OUT"
exit $FAILED
