# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench bench-all clean-venv

$(STAMP): requirements.txt setup.cfg
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "error: $(PYTHON) not found. iNNvestigate 2.1.2 supports Python < 3.12 only: install Python 3.11 (e.g. 'pyenv install 3.11') or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' || { \
	  echo "error: $(PYTHON) is not Python 3.11 (innvestigate 2.1.2 needs Python < 3.12, tensorflow 2.14 needs >= 3.9): point PYTHON= at a 3.11 interpreter" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m toolchain.demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q --durations=25

test-all: $(STAMP)
	$(PY) -m pytest -q

# the comparison suite (ours vs float32, uniform int8, magnitude pruning + int8, official int8)
bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# every benchmark; each writes benchmarks/results/ and README's results sections are regenerated
bench-all: $(STAMP)
	$(PY) benchmarks/relevance_speed.py
	$(PY) benchmarks/pruning.py
	$(PY) benchmarks/distillation.py
	$(PY) benchmarks/kernel_speed.py
	$(PY) benchmarks/tradeoff.py
	$(PY) benchmarks/quantization.py
	$(PY) benchmarks/export.py
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/paper.py
	$(PY) benchmarks/update_readme.py

clean-venv:
	rm -rf $(VENV)
