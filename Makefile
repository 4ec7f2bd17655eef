# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1

.PHONY: demo test bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: venv
	$(VENV)/bin/qvl demo --out demo_out

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/curate_filter.py

clean:
	rm -rf demo_out bench_out .pytest_cache
