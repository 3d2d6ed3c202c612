#!/usr/bin/env bash
# The GPU benchmarks in one go, on a machine with one NVIDIA GPU and no internet (issue 15).
#
#   bash bench/gpu.sh               # from the repo root: install what is missing, run, record
#   bash bench/gpu.sh --dry-run     # print the exact commands and check the wheels; runs nothing heavy
#   bash bench/gpu.sh --fetch-wheels   # on a networked machine: fill wheels/ for the GPU machine
#
# Options: --wheels DIR (default: wheels/ in the repo root), --python PY (default: $PYTHON or
# python3). The limits below keep the whole run within 8 minutes; each step is stopped at its own.
#
# wheels/: the packages cytosynth needs (pyproject.toml) that the GPU machine lacks, made on a
# networked machine by `bash bench/gpu.sh --fetch-wheels` for the GPU machine's Python and platform
# (FETCH_PYTHON, FETCH_PLATFORMS below; CPython 3.12 on x86_64 Linux by default) and carried
# beside the repo. pip cannot leave a dependency out, so the fetch downloads torch and the CUDA
# stack too and then deletes them (the GPU machine has its own). deepspeed comes as its source
# archive (PyPI has no wheel): it is installed against the machine's torch, its ops compiled on
# first use. A file over 60 MiB (ray's wheel is larger) is split for carrying:
#     split -b 60M -d ray-X.whl ray-X.whl.part-   &&  rm ray-X.whl       (the fetch does this)
# and joined again on the GPU machine, before pip runs (this script does this):
#     cat ray-X.whl.part-* > ray-X.whl
#
# Run: pip install from wheels/ only (--no-index), then bench/throughput.py --preset sd15 and
# bench/finetune.py on cuda; throughput appends its own section to bench/RESULTS.md (--append),
# the finetune table is appended under a heading naming the device, date and command.
# /wheels/ is git-ignored: carry it with the checkout (whatever carries files there may cap the total).
set -euo pipefail

INSTALL_LIMIT_S=80
THROUGHPUT_LIMIT_S=170
FINETUNE_LIMIT_S=220
SPLIT_BYTES=60M
FETCH_PYTHON=3.12
FETCH_PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 linux_x86_64)
# deepspeed's own requirements: its source archive is fetched without them (see fetch()).
DEEPSPEED_DEPS=(einops hjson msgpack ninja numpy packaging psutil py-cpuinfo 'pydantic>=2' tqdm nvidia-ml-py)
# Settings that fit the limits on one H100/H200: 8 timed 1024x1024 tiles (2 shards of 4) after
# one warm-up shard; each training job once with ZeRO-2, 8 steps, the median of the last 5.
THROUGHPUT_ARGS=(--preset sd15 --device cuda --tile-size 1024 --batch-size 4 --tiles 8 --baseline-repeats 1 --append)
FINETUNE_ARGS=(--device cuda --workers 1 --preset sd15 --tile-size 1024 --steps 8 --warmup 3 --zero-stages 2)

die() { echo "error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$ROOT/wheels"
PY=${PYTHON:-python3}
MODE=run
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry-run ;;
        --fetch-wheels) MODE=fetch ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$2; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PY=$2; shift ;;
        -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see bash bench/gpu.sh --help)" ;;
    esac
    shift
done
command -v "$PY" >/dev/null || die "no python interpreter '$PY' (set --python or \$PYTHON)"
cd "$ROOT"

# Requirement names of pyproject.toml, one per line (stdlib only: the machine may lack the rest).
requirements() {
    "$PY" - <<'EOF'
import re, tomllib
for spec in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    print(re.match(r"[A-Za-z0-9_.-]+", spec).group(0))
EOF
}

# The requirements this interpreter does not have installed.
missing_packages() {
    requirements | "$PY" -c '
import importlib.metadata as md, sys
for name in sys.stdin.read().split():
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(name)'
}

# The wheel (or source archive) of distribution $1 in $WHEELS, a split wheel's parts counting.
wheel_of() {
    local name
    name=$(echo "$1" | tr 'A-Z' 'a-z' | sed 's/[-_.]\{1,\}/[-_.]/g')
    ls "$WHEELS" 2>/dev/null | grep -i -E "^${name}-[0-9][^/]*(\.whl|\.tar\.gz|\.zip|\.whl\.part-[a-z0-9]+)$" | head -1 || true
}

show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

fetch() {
    mkdir -p "$WHEELS"
    local platforms=() p
    for p in "${FETCH_PLATFORMS[@]}"; do platforms+=(--platform "$p"); done
    local binaries
    binaries=$(requirements | grep -v -i -x -E 'deepspeed' | tr '\n' ' ')
    # A target platform needs wheels only (pip's rule), so deepspeed, which PyPI ships as source
    # only, comes in a second download without its dependencies, and those come in the first.
    # shellcheck disable=SC2086
    "$PY" -m pip download --dest "$WHEELS" --only-binary=:all: --python-version "$FETCH_PYTHON" \
        --implementation cp "${platforms[@]}" $binaries 'ray[default,train]' "${DEEPSPEED_DEPS[@]}"
    "$PY" -m pip download --dest "$WHEELS" --no-deps --no-binary=:all: deepspeed
    # The GPU machine has its own torch and CUDA libraries: do not carry them.
    find "$WHEELS" -maxdepth 1 -type f \( -iname 'torch-*' -o -iname 'torchvision-*' -o -iname 'torchaudio-*' \
        -o -iname 'triton-*' -o -iname 'nvidia_*' -o -iname 'cuda_*' \) -print -delete
    local f
    for f in "$WHEELS"/*; do
        if [ "$(stat -c %s "$f")" -gt $((60 * 1024 * 1024)) ]; then
            split -b "$SPLIT_BYTES" -d "$f" "$f.part-" && rm "$f"
            echo "split $(basename "$f") into $(ls "$f".part-* | wc -l) parts"
        fi
    done
    du -sh "$WHEELS"
}

if [ "$MODE" = fetch ]; then
    fetch
    exit 0
fi

# What would be installed, checked before anything runs: one line naming every missing wheel.
MISSING=$(missing_packages | tr '\n' ' ')
ABSENT=()
for name in $MISSING; do
    [ -n "$(wheel_of "$name")" ] || ABSENT+=("$name")
done
if [ ${#ABSENT[@]} -gt 0 ]; then
    die "this machine lacks ${ABSENT[*]} and $WHEELS holds no wheel for them; make the folder on a networked machine with 'bash bench/gpu.sh --fetch-wheels' and carry it here"
fi

STEPS=()  # each: a command line, shown in --dry-run and run in order otherwise
for part in "$WHEELS"/*.whl.part-00; do
    [ -e "$part" ] || continue
    whole=${part%.part-00}
    [ -e "$whole" ] || STEPS+=("cat $(printf %q "$whole").part-* > $(printf %q "$whole")")
done
INSTALL=(timeout -k 10 "$INSTALL_LIMIT_S" "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation -e .)
THROUGHPUT=(timeout -k 10 "$THROUGHPUT_LIMIT_S" "$PY" bench/throughput.py "${THROUGHPUT_ARGS[@]}")
FINETUNE=(timeout -k 10 "$FINETUNE_LIMIT_S" "$PY" bench/finetune.py "${FINETUNE_ARGS[@]}")

if [ "$MODE" = dry-run ]; then
    echo "# bench/gpu.sh --dry-run: missing packages: ${MISSING:-none}; wheels: $WHEELS"
    for step in "${STEPS[@]+"${STEPS[@]}"}"; do echo "+ $step"; done
    if [ -n "$MISSING" ] || ! "$PY" -c 'import cytosynth.storage' 2>/dev/null; then show "${INSTALL[@]}"; fi
    show "${THROUGHPUT[@]}"
    show "${FINETUNE[@]}"
    echo "# then: the finetune table appended to bench/RESULTS.md"
    exit 0
fi

command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "warning: nvidia-smi not found" >&2
for step in "${STEPS[@]+"${STEPS[@]}"}"; do echo "+ $step"; bash -c "$step"; done
if [ -n "$MISSING" ] || ! "$PY" -c 'import cytosynth.storage' 2>/dev/null; then show "${INSTALL[@]}"; "${INSTALL[@]}"; fi

status=0
show "${THROUGHPUT[@]}"
"${THROUGHPUT[@]}" || { echo "error: bench/throughput.py failed or passed ${THROUGHPUT_LIMIT_S} s (exit $?); nothing of it recorded" >&2; status=1; }

show "${FINETUNE[@]}"
log=$(mktemp)
set +e
"${FINETUNE[@]}" | tee "$log"
code=${PIPESTATUS[0]}
set -e
if grep -q '^| finetune\|^| train' "$log"; then
    device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo unknown)
    note=""
    [ "$code" -eq 0 ] || { note=" (stopped at the ${FINETUNE_LIMIT_S} s limit or failed, exit $code: the rows it finished)"; status=1; }
    {
        echo
        echo "### $(date -u +%Y-%m-%d), $device, bench/gpu.sh: bench/finetune.py$note"
        echo
        echo "\`python bench/finetune.py ${FINETUNE_ARGS[*]}\` — $(head -1 "$log" | sed 's/^# //')"
        echo
        grep '^|' "$log"
    } >> bench/RESULTS.md
    echo "appended the finetune table to bench/RESULTS.md"
else
    echo "error: bench/finetune.py finished no job (exit $code); nothing of it recorded" >&2
    status=1
fi
rm -f "$log"
exit $status
