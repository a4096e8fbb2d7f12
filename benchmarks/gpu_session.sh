#!/usr/bin/env bash
# One lent GPU, one call: issue #13's figures and the suite on CUDA.
#
# The device machine has torch and Triton but not the rest of the stack, and it reaches no registry. So:
#
#   bash benchmarks/gpu_session.sh prepare      # here: wheels for Python 3.12 into .whl/ (about 15 MiB)
#   # then one device call, from the repository root, carrying .whl:
#   #   run(command="bash benchmarks/gpu_session.sh run", carry=[".whl"], timeout_s=580)
#
# `run` installs the wheels into /tmp/site, then writes under $OUT (or ./gpu-out):
#   bench_gpu.md / bench_gpu.json   `benchmarks/bench_gpu.py`, one section at a time, each with its own timeout
#   profile/                        `bench_gpu_sft.py --profile`: the step's top operators and a Chrome trace
#   pytest.log                      `pytest -m "not vllm"` on CUDA, with the time that is left
# Sections and the pytest run share BUDGET_S seconds (default 540); pytest gets what the benchmark left.
# PARTS (default "bench profile pytest") picks the parts, e.g. PARTS=pytest for a second call.
set -uo pipefail

WHEELS=(transformers==5.19.0 trl==1.16.0 peft==0.21.2 datasets==5.2.0 math-verify==0.9.0
        latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 dill==0.4.1 multiprocess==0.70.19
        pytest-xdist==3.8.0 execnet==2.1.2)

prepare() {
  mkdir -p .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
  du -sh .whl
}

run() {
  local out=${OUT:-$PWD/gpu-out} budget=${BUDGET_S:-540} t0
  mkdir -p "$out"
  t0=$(date +%s)
  left() { echo $(( budget - ($(date +%s) - t0) )); }
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed" | tee "$out/FAILED"; return 1; }
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia-smi.csv"
  # the sections in the order the acceptance needs them; each writes its own JSON
  local section limit parts=" ${PARTS:-bench profile pytest} "
  [[ $parts == *" bench "* ]] && for section in env:60 quant:60 gemm:90 linear:90 experts:120 sft_step:240; do
    limit=${section#*:}; section=${section%%:*}
    (( $(left) > 30 )) || { echo "== $section skipped: budget spent" | tee -a "$out/bench_gpu.md"; continue; }
    (( limit > $(left) )) && limit=$(left)
    echo "== $section (limit ${limit}s, t=$(( $(date +%s) - t0 ))s)" | tee -a "$out/bench_gpu.md"
    timeout "$limit" python3 benchmarks/bench_gpu.py --sections "$section" --json "$out/bench_gpu.$section.json" \
      2>"$out/bench_gpu.$section.err" | tee -a "$out/bench_gpu.md"
    echo "(rc=$?)" | tee -a "$out/bench_gpu.md"
  done
  # the profiler pass over the SFT step (bf16, 8k rows): top operators by GPU time, a Chrome trace
  limit=$(left)
  if [[ $parts == *" profile "* ]] && (( limit > 150 )); then
    echo "== profile (limit 90s)" | tee -a "$out/bench_gpu.md"
    timeout 90 python3 benchmarks/bench_gpu_sft.py --seqs 8192 --variants bf16 --iters 3 --profile "$out/profile" \
      --json "$out/profile/rows.json" 2>"$out/profile.err" | tee -a "$out/bench_gpu.md"
  fi
  limit=$(left)
  if [[ $parts == *" pytest "* ]] && (( limit > 60 )); then
    echo "== pytest -m 'not vllm' (limit ${limit}s)"
    local xdist=()
    python3 -c "import xdist" 2>/dev/null && xdist=(-n 8 --dist loadfile)
    timeout "$limit" python3 -m pytest -q -m "not vllm" -p no:cacheprovider "${xdist[@]}" --timeout 600 tests \
      > "$out/pytest.log" 2>&1
    echo "(rc=$?)" >> "$out/pytest.log"
    tail -40 "$out/pytest.log"
  else
    echo "pytest not run (not in PARTS, or the budget is spent)" | tee "$out/pytest.log"
  fi
  echo "== done in $(( $(date +%s) - t0 ))s"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
