# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1

.PHONY: demo test interop bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/qvl demo --out demo_out

test: venv
	$(PY) -m pytest -q --ignore=tests/interop

# ms-swift's and LLaMA-Factory's own preprocessing on qvl's exports (tests/interop): their venvs
# go to $(QVL_INTEROP_DIR) (default .interop/; ~6.5 min to install the first time, seconds after),
# the tests take 3-4 min on 2 cores (3 models x 2 tools), so they are not part of `make test`.
interop: venv
	QVL_PYTHON=$(abspath $(PY)) tests/interop/setup_consumers.sh
	QVL_INTEROP=1 $(PY) -m pytest -q tests/interop

bench: venv
	$(PY) benchmarks/curate_filter.py

clean:
	rm -rf demo_out bench_out .pytest_cache  # .interop/ (the consumers' venvs) is kept
