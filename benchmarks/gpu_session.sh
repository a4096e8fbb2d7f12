#!/usr/bin/env bash
# A lent GPU: issue #13's figures and the suite on CUDA.
#
# The device machine has torch and Triton but not the rest of the stack, and it reaches no registry. So:
#
#   bash benchmarks/gpu_session.sh prepare      # here: wheels for Python 3.12 into .whl/ (about 15 MiB)
#   # then device calls from the repository root, carrying .whl.
#   A task's device time is 15 minutes in all (the machine's start included) and one call at most 10: plan two calls,
#     1. run(command="PARTS=bench bash benchmarks/gpu_session.sh run", carry=[".whl"], timeout_s=590)
#        the acceptance tables first (env gemm linear quant experts sft_step), then lm_head,norm,mla and gemm_sweep;
#     2. run(command="PARTS='pytest unfused profile' BUDGET_S=<what is left> bash benchmarks/gpu_session.sh run", ...)
#   the second at once (the machine goes back after 30 s idle, and a fresh start costs minutes of the 15), and give
#   the machine back after the last one. In session 11 a second call was refused.
#
# `run` installs the wheels into /tmp/site, then writes to $OUT (or ./gpu-out) gpu-out.tgz, which holds:
#   env.txt                         the GPU and the versions
#   bench_gpu.md, bench_gpu.*.json  `benchmarks/bench_gpu.py`, one section at a time, each with its own timeout
#   profile/                        `bench_gpu_sft.py --profile`: the step's top operators and a Chrome trace
#   unfused.json                    the bf16 step with the fused glue kernels on and off, in one process (A/B)
#   compiled.json                   the bf16 step under accelerate's regional compilation (an experiment; not in
#                                   the default PARTS)
#   pytest.log                      `pytest -m "not vllm"` on CUDA (-v: each result as it lands)
# and bench_gpu.md and pytest.log beside it. All parts share BUDGET_S seconds (default 560). A section or part
# stopped at its limit keeps the rows it had measured (bench_gpu.py and bench_gpu_sft.py write them on SIGTERM);
# a part skipped for want of time says so in bench_gpu.md. Every part or section that exits non-zero (stopped at its
# limit included) is named at the end and in $OUT/FAILED, and `run` then exits 1; an unknown PARTS entry is one too.
# Session 11 (one H100): env 3 s, sft_step 94 s (4 rows; 6 now), quant 17 s, experts 26 s, gemm 19 s, linear 11 s,
# each plus ~7 s of start-up; pytest -n 14 had not finished in 120 s (3 slow tests left).
# PARTS (default "bench pytest unfused profile") picks the parts and their order; SECTIONS the benchmark sections
# (name:limit_s); PYTEST_S caps pytest (default 200 s); PYTEST_TARGETS / PYTEST_MARK / PYTEST_WORKERS / PYTEST_DIST shape it.
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
  # The device tool brings back at most 8 files from $OUT: everything is written to $work and tarred into
  # $OUT/gpu-out.tgz after every part, so a call cut off by its limit still returns what was done.
  # a fresh work folder per call: a warm machine's second call must not pack (or append to) the first one's files
  local out=${OUT:-$PWD/gpu-out} budget=${BUDGET_S:-560} work t0 failed=()
  work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-work.XXXXXX")
  mkdir -p "$out"
  t0=$(date +%s)
  left() { echo $(( budget - ($(date +%s) - t0) )); }
  pack() { tar czf "$out/gpu-out.tgz" -C "$work" . 2>/dev/null; cp -f "$work"/bench_gpu.md "$work"/pytest.log "$out"/ 2>/dev/null; true; }
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed" | tee "$out/FAILED"; return 1; }
  fi
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton, transformers, trl, datasets, peft, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
  } 2>&1 | tee "$work/env.txt"
  # one bench_gpu_sft.py run as a part NAME: at most CAP s, skipped when no more than MIN s are left
  sft_part() {
    local name=$1 cap=$2 min=$3 limit; shift 3
    limit=$(( $(left) < cap ? $(left) : cap ))
    (( limit > min )) || { echo "== $name skipped: ${limit}s left, it needs more than ${min}s" | tee -a "$work/bench_gpu.md"; return 0; }
    echo "== $name (limit ${limit}s)" | tee -a "$work/bench_gpu.md"
    timeout -k 15 "$limit" python3 benchmarks/bench_gpu_sft.py "$@" 2>"$work/$name.err" | tee -a "$work/bench_gpu.md"
    local rc=${PIPESTATUS[0]}
    echo "(rc=$rc)" | tee -a "$work/bench_gpu.md"
    (( rc == 0 )) || failed+=("$name (rc=$rc)")
    pack
  }
  local part section limit rc
  for part in ${PARTS:-bench pytest unfused profile}; do
    case $part in
    bench)
      # the acceptance tables first, the diagnostics after; each entry (a section, or sections joined by commas that
      # share one process and its ~8 s of start-up) writes its own JSON
      for section in ${SECTIONS:-env:20 gemm:60 linear:50 quant:45 experts:55 sft_step:200 lm_head,norm,mla:100 gemm_sweep:45}; do
        limit=${section#*:}; section=${section%%:*}
        (( $(left) > 30 )) || { echo "== $section skipped: budget spent" | tee -a "$work/bench_gpu.md"; continue; }
        (( limit > $(left) )) && limit=$(left)
        echo "== $section (limit ${limit}s, t=$(( $(date +%s) - t0 ))s)" | tee -a "$work/bench_gpu.md"
        timeout -k 15 "$limit" python3 benchmarks/bench_gpu.py --sections "$section" --json "$work/bench_gpu.$section.json" \
          2>"$work/bench_gpu.$section.err" | tee -a "$work/bench_gpu.md"
        rc=${PIPESTATUS[0]}
        echo "(rc=$rc)" | tee -a "$work/bench_gpu.md"
        (( rc == 0 )) || failed+=("bench $section (rc=$rc)")
        tail -5 "$work/bench_gpu.$section.err"
        pack
      done ;;
    unfused)
      # the A/B of the toolkit's fused RMSNorm, MoE routing, MLA assembly and SwiGLU kernels on the bf16 8k step
      sft_part unfused 120 40 --seqs 8192 --variants bf16,bf16-unfused --json "$work/unfused.json" ;;
    profile)
      # the profiler pass over the SFT step (bf16, 8k rows): top operators by GPU time, a Chrome trace
      sft_part profile 90 40 --seqs 8192 --variants bf16 --iters 3 --profile "$work/profile" \
        --json "$work/profile/rows.json" ;;
    compiled)
      # an experiment: the bf16 step under accelerate's regional compilation. Each block class compiles, and the
      # dense, MoE and MTP blocks recompile once each: within the first two steps on the CPU smoke shapes, so
      # 6 warm-up steps leave margin.
      sft_part compiled 150 60 --seqs 8192 --variants bf16 --compile-layers --warmup 6 --iters 6 \
        --json "$work/compiled.json" ;;
    pytest)
      limit=$(( $(left) < ${PYTEST_S:-200} ? $(left) : ${PYTEST_S:-200} ))
      if (( limit > 60 )); then
        echo "== pytest -m 'not vllm' (limit ${limit}s, t=$(( $(date +%s) - t0 ))s)"
        # -v: xdist prints each result as it lands, so a run cut off by the limit still names its failures
        timeout -k 15 "$limit" python3 -m pytest -v -m "${PYTEST_MARK:-not vllm}" -p no:cacheprovider \
          -n "${PYTEST_WORKERS:-12}" --dist "${PYTEST_DIST:-loadfile}" --no-loadscope-reorder --timeout 300 --tb=short \
          ${PYTEST_TARGETS:-tests} > "$work/pytest.log" 2>&1
        rc=$?
        echo "(rc=$rc)" >> "$work/pytest.log"
        (( rc == 0 )) || failed+=("pytest (rc=$rc)")
        grep -E "FAILED|ERROR|passed|failed" "$work/pytest.log" | tail -40
        pack
      else
        echo "pytest not run: the budget is spent" | tee "$work/pytest.log"
      fi ;;
    *)
      echo "== unknown part '$part' (parts: bench pytest unfused profile compiled)" | tee -a "$work/bench_gpu.md"
      failed+=("unknown part '$part'") ;;
    esac
  done
  pack
  rm -rf "$work"
  echo "== done in $(( $(date +%s) - t0 ))s"
  if (( ${#failed[@]} )); then
    printf '%s\n' "${failed[@]}" > "$out/FAILED"
    echo "== FAILED: ${failed[*]}" >&2
    return 1
  fi
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
