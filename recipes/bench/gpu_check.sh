#!/usr/bin/env bash
# The repository's GPU check, in one run of about 6 minutes (at most GPU_CHECK_BUDGET = 420 s + 5 s): the adapter
# benchmark at RoBERTa-base size in fp32 and in bf16 autocast (step time, peak memory, ops per step, memory proxy),
# the GS-multiply kernel benchmark, the DreamBooth UNet benchmark at full SD 2.1 size, then the kernel tests.
#
#   bash recipes/bench/gpu_check.sh                  # from the repository root, on a machine with a CUDA GPU
#   GPU_CHECK_DRY=1 bash recipes/bench/gpu_check.sh  # every stage at --quick / CPU sizes: tests the plumbing, < 2 min
#
# Every benchmark runs as `python recipes/benchmark.py NAME ...` (options: configs/bench/NAME.yaml, then the flags
# below) and writes NAME.md (its tables), NAME.json and NAME.png into its --output_dir.
#
# The GPU machine's python3 must have torch, triton, transformers and accelerate. Packages it lacks come as wheels in
# .whl/ (made elsewhere: pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
# manylinux2014_x86_64 -d .whl peft==0.21.2 diffusers==0.42.1 importlib_metadata), installed into a private target
# directory. The stages run in a temporary copy of the tree (tracked and untracked, not ignored, files) in which
# kernels/ is copied to gsoft/kernels, so the fused kernels import as gsoft.kernels without pip install.
#
# Every stage runs under `timeout`: its own limit, cut to what the budget leaves after the minimum the later stages
# need (a stage that would get less than its minimum is skipped and says so). A failing stage records its exit code
# and the tail of its log; the script goes on. Results: $OUT/summary.txt (stage codes and times, every table; printed
# last) and $OUT/all.tgz (every log and every benchmark's .md, .json and .png), rewritten after each stage.
#
# Environment: OUT (default outputs/gpu_check), GPU_CHECK_DRY (1 = CPU plumbing run), GPU_CHECK_BUDGET (seconds,
# default 420), PYTHON (default python3).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ROOT=$(pwd)
OUT=${OUT:-outputs/gpu_check}
case $OUT in /*) ;; *) OUT=$ROOT/$OUT ;; esac  # the stages run elsewhere (the temporary copy)
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-420}
PY=${PYTHON:-python3}
START=$SECONDS
if [ ! -f "$ROOT/recipes/benchmark.py" ]; then
  echo "run from the repository root: no recipes/benchmark.py in $ROOT (cd there, then bash recipes/bench/gpu_check.sh)"
  exit 2
fi
mkdir -p "$OUT"
W=$(mktemp -d)
L=$W/gpu_check  # logs and result directories; packed into all.tgz
mkdir -p "$L"
trap 'rm -rf "$W"' EXIT
S=$OUT/summary.txt
: > "$S"
STATUS=()
# Minimum seconds of each stage, in order; a stage may only use the budget the later stages' minimums leave.
declare -A FLOOR=([env]=10 [bench_adapters_fp32]=40 [bench_adapters_bf16]=30 [bench_kernels]=30
                  [bench_kernels_sweep]=20 [bench_dreambooth]=40 [test_kernels]=40)
RESERVE=0
for f in "${FLOOR[@]}"; do RESERVE=$((RESERVE + f)); done

say() { echo "$*" | tee -a "$S"; }

pack() { cp "$S" "$L/summary.txt"; tar -czf "$OUT/all.tgz" -C "$W" gpu_check; }

copy_tree() {  # tracked + untracked (not ignored) files of the checkout; all files when it is not a git work tree
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
      | tar -C "$ROOT" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$W"
  fi
  if [ ! -f "$W/gsoft/__init__.py" ]; then
    tar -C "$ROOT" --exclude=./.git --exclude=./outputs --exclude=./.venv --exclude=./.whl -cf - . | tar -xf - -C "$W"
  fi
  rm -rf "$W/gsoft/kernels"
  cp -r "$W/kernels" "$W/gsoft/kernels"
}

# run_stage NAME LIMIT TABLE COMMAND...: run COMMAND under timeout in the copy; append TABLE (a benchmark's NAME.md)
# or, when the stage failed or has no table, the tail of its log to the summary.
run_stage() {
  local name=$1 limit=$2 table=$3
  shift 3
  local floor=${FLOOR[$name]}
  RESERVE=$((RESERVE - floor))
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  ((limit > left)) && limit=$left
  say ""
  if ((limit < floor)); then
    say "=== $name: skipped ($((BUDGET - (SECONDS - START)))s of the ${BUDGET}s budget left, ${RESERVE}s of it kept" \
      "for the later stages; this stage needs ${floor}s)"
    STATUS+=("$name: skipped (budget)")
    return
  fi
  say "=== $name ($(date +%T), limit ${limit}s)"
  local t0=$SECONDS rc
  timeout -k 5 "$limit" "$@" >"$L/$name.log" 2>&1
  rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" (timed out at ${limit}s)"
  say "rc $rc in $((SECONDS - t0))s$note"
  STATUS+=("$name: rc $rc, $((SECONDS - t0))s$note")
  if [ -n "$table" ] && [ -s "$table" ]; then
    cat "$table" >>"$S"
  fi
  if ((rc != 0)) || [ -z "$table" ] || [ ! -s "$table" ]; then
    echo "--- last lines of $name.log" >>"$S"
    tail -n 25 "$L/$name.log" >>"$S"
  fi
  pack
}

# ---- setup: wheels, the copy of the tree ---------------------------------------------------------------------------
MODE="on the GPU"
((DRY)) && MODE="DRY RUN (CPU, --quick sizes)"
say "gpu_check $MODE — $(date -Is), budget ${BUDGET}s"
if ((!DRY)) && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
    "$ROOT"/.whl/*.whl >"$L/pip.log" 2>&1 || {
    say "pip install of .whl/ failed (rc $?); the env stage names what is missing:"
    tail -n 5 "$L/pip.log" | tee -a "$S"
  }
fi
copy_tree
export PYTHONPATH=$W/site:$W${PYTHONPATH:+:$PYTHONPATH}
cd "$W" || exit 2

# ---- the stages ----------------------------------------------------------------------------------------------------
METHODS_FP32=base,gsoft,gsoft_torch,gsoft_triton,double_gsoft,lora,oft,boft
METHODS_BF16=base,gsoft,gsoft_torch,gsoft_triton,double_gsoft,lora
if ((DRY)); then
  BA=(--devices cpu --quick --models minilm --layers 1 --batch_size 2 --seq_len 16 --infer_rounds 1)
  BA_ROUNDS=(1 1)  # fp32, bf16
  BK=(--quick --device cpu)
  BK_SWEEP=(--quick --device cpu)
  BD=(--quick --device cpu)
  TK=(-k "plans_cover or config_backend")
else
  BA=(--devices cuda --models roberta-base --batch_size 32 --seq_len 128)
  BA_ROUNDS=(4 3)  # fp32 (~100 s with BOFT), bf16 (~60 s)
  BK=(--hidden 768,4096 --tokens 16384,65536 --dtypes bf16)
  BK_SWEEP=()
  BD=(--unet sd21 --reduced false --batch_size 4 --resolution 512 --device cuda)
  TK=()
fi

cat >"$L/env_check.py" <<'PY'
"""Versions of everything the stages import; a missing package is named, not fatal."""
import importlib
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
for name in ("triton", "transformers", "accelerate", "peft", "diffusers", "gsoft", "gsoft.kernels"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')} ({module.__file__})")
    except Exception as exc:  # noqa: BLE001 - report every missing piece at once
        print(f"{name}: MISSING ({type(exc).__name__}: {exc})")
PY
run_stage env 30 "" bash -c 'if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -4
  else echo "no nvidia-smi"; fi
  "$1" "$2"' env "$PY" "$L/env_check.py"

run_stage bench_adapters_fp32 130 "$L/ba_fp32/adapters.md" \
  "$PY" recipes/benchmark.py adapters "${BA[@]}" --rounds "${BA_ROUNDS[0]}" --methods "$METHODS_FP32" \
  --output_dir "$L/ba_fp32"
run_stage bench_adapters_bf16 80 "$L/ba_bf16/adapters.md" \
  "$PY" recipes/benchmark.py adapters "${BA[@]}" --rounds "${BA_ROUNDS[1]}" --methods "$METHODS_BF16" \
  --autocast bf16 --output_dir "$L/ba_bf16"
run_stage bench_kernels 70 "$L/bk/kernels.md" \
  "$PY" recipes/benchmark.py kernels "${BK[@]}" --methods torch,triton,dense,peft_oft --output_dir "$L/bk"
if timeout 60 "$PY" recipes/benchmark.py kernels --help 2>/dev/null | grep -q -- "--sweep"; then
  run_stage bench_kernels_sweep 60 "$L/bk_sweep/kernels_sweep.md" \
    "$PY" recipes/benchmark.py kernels ${BK_SWEEP[@]+"${BK_SWEEP[@]}"} --sweep --output_dir "$L/bk_sweep"
else
  RESERVE=$((RESERVE - FLOOR[bench_kernels_sweep]))
  say ""
  say "=== bench_kernels_sweep: skipped (recipes/benchmark.py kernels has no --sweep option)"
  STATUS+=("bench_kernels_sweep: skipped (no --sweep)")
fi
run_stage bench_dreambooth 110 "$L/bd/dreambooth.md" \
  "$PY" recipes/benchmark.py dreambooth "${BD[@]}" --output_dir "$L/bd"
run_stage test_kernels 90 "" \
  "$PY" -m pytest tests/test_kernels.py -q -rfEs -p no:cacheprovider ${TK[@]+"${TK[@]}"}

say ""
say "=== done in $((SECONDS - START))s ($(date +%T))"
for line in "${STATUS[@]}"; do say "  $line"; done
pack
echo
echo "################ summary ($S; logs and results: $OUT/all.tgz) ################"
cat "$S"
