#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), what benchmarks/gpu_check.sh must install on the GPU machine
# (Python 3.12, x86-64, nothing downloadable there) into ONE ignored folder, .gpu_vendor/:
#   - a DeepSpeed 0.19.8 wheel built HERE from its sdist (PyPI has no wheel): py3-none-any, no op compiled
#     (DS_BUILD_OPS=0: every op is JIT-compiled on first use, on any accelerator). Its setup.py must not run
#     on the GPU machine: when it detects CUDA it adds nvidia-ml-py to the requirements (not vendored) and,
#     without nvcc, raises MissingCUDAException in builder.is_compatible(), which it calls for every op
#     whatever DS_BUILD_OPS says. Built with DS_ACCELERATOR=cpu, the wheel requires no nvidia-ml-py
#     (DeepSpeed's CUDA accelerator imports pynvml only if present) and records no installed op,
#   - cp312 manylinux wheels of what the GPU image lacks: DeepSpeed's requirements (hjson, pydantic,
#     pydantic-core, annotated-types, typing-inspection, msgpack, psutil, py-cpuinfo, einops, ninja,
#     packaging, typing-extensions), lmdb, pytest, pytest-timeout and pytest's (pluggy, iniconfig, pygments).
# The versions are pinned to those the CPU suite runs with. gpu_check.sh installs from the folder with
# `pip install --no-index --find-links`, so only what is missing (or too old) there is installed.
#
#   bash benchmarks/gpu_vendor.sh            # then carry .gpu_vendor with the call (device tool: carry)
# Knobs: GPU_VENDOR (folder), PYTHON (the pip that downloads), GPU_PYTHON_VERSION (3.12).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${GPU_VENDOR:-.gpu_vendor}
PY=${PYTHON:-python3}
PYVER=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MIB=32   # the working tree and carried folders travel together within 64 MiB

SDIST=deepspeed==0.19.8
# DeepSpeed 0.19.8 requires: einops hjson msgpack ninja numpy packaging>=20 psutil py-cpuinfo pydantic>=2 torch tqdm
# (numpy, torch, tqdm are on the GPU image); pydantic 2.14 requires pydantic-core==2.50.5, annotated-types,
# typing-extensions>=4.16, typing-inspection; pytest 9.2 requires iniconfig, packaging>=24, pluggy>=1.6, pygments
WHEELS=(
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 msgpack==1.2.4 psutil==7.2.2 py-cpuinfo==9.0.0 einops==0.8.2 ninja==1.13.2
    packaging==26.3 lmdb==3.0.0 pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$DEST"
if ! ls "$DEST"/deepspeed-0.19.8-py3-none-any.whl > /dev/null 2>&1; then
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$SRC" "$SDIST"
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w "$DEST" \
        "$SRC"/deepspeed-0.19.8.tar.gz
fi
rm -f "$DEST"/deepspeed-*.tar.gz   # an sdist there would run setup.py on the GPU machine
# the wheel must be accelerator-neutral: no nvidia-ml-py requirement, no pre-built op
"$PY" - "$DEST"/deepspeed-0.19.8-py3-none-any.whl <<'PYEOF' || exit 1
import sys, zipfile
whl = zipfile.ZipFile(sys.argv[1])
meta = whl.read("deepspeed-0.19.8.dist-info/METADATA").decode()
info = whl.read("deepspeed/git_version_info_installed.py").decode()
bad = [r for r in meta.splitlines() if r.startswith("Requires-Dist:") and "nvidia-ml-py" in r]
if bad or "installed_ops" not in info or ": True" in info:
    sys.exit(f"gpu_vendor.sh: {sys.argv[1]} is not accelerator-neutral: {bad or info}")
PYEOF
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${WHEELS[@]}"

# one version of each: two would stop the offline install
dupes=$(ls "$DEST" | sed -E 's/-[0-9][^-]*(-.*)?\.(whl|tar\.gz)$//' | tr '[:upper:]_' '[:lower:]-' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_vendor.sh: several versions in $DEST of: $dupes (empty the folder and rerun)" >&2; exit 1; }
size=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST" | wc -l) files, ${size} MiB"
[ "$size" -le "$LIMIT_MIB" ] || { echo "gpu_vendor.sh: $DEST is over ${LIMIT_MIB} MiB" >&2; exit 1; }
