# The two commands of the README. Each creates .venv and installs the
# package into it on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test benchmark clean

train: $(STAMP)
	$(PY) -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits

# Two workers, one test file each: compiling is single-threaded, so a second
# worker overlaps it with the other's XLA work (17 min 6 s, 340 tests, in a
# fresh CI checkout on 2 cores, 2026-12-02).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

benchmark: $(STAMP)
	$(PY) benchmarks/throughput.py

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) workdirs
