# raymoe: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raymoe-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-gpu lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned, so that the package's torch>=2.13 is already met by the CPU wheel
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raymoe demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when no test is marked slow: that is not a failure
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# on a machine with a CUDA GPU: the gpu tests, the kernels compiled, bench kernels and bench model (.ci/gpu);
# it uses the python that holds a CUDA torch (GPU_PYTHON, default python3), not the CPU-only .venv
test-gpu:
	.ci/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(VENV)/bin/raymoe bench model

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
