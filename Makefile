# The two commands of the README. Each creates .venv and installs the
# package into it on first use (and again when pyproject.toml or the lock
# changes): first the exact tested set of requirements.lock, then the package
# itself without resolving anything more (pyproject.toml declares the ranges
# it works in; `pip check` confirms the lock lies within them).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: train test test-isa benchmark clean

train: $(STAMP)
	$(PY) -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits

# Two workers, one test file each: compiling is single-threaded, so a second
# worker overlaps it with the other's XLA work (13 min 20 s to 15 min 41 s,
# 359-360 tests, in three fresh CI checkouts on 2 cores, 2026-12-07).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The tests that compare two programs that round differently (marker
# `rounding`; tests/rounding.py), with the instruction set capped below any
# x86-64 CPU's of today (SSE4.2 for XLA, SSE4.1 for oneDNN): their rounding
# changes as another CPU's would, and their bounds, measured in the test,
# must follow.
ISA_CAP := XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41
test-isa: $(STAMP)
	$(ISA_CAP) $(PY) -m pytest -q -n 2 --dist loadfile -m rounding tests

benchmark: $(STAMP)
	$(PY) benchmarks/throughput.py

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e '.[test]'
	$(PY) -m pip check
	touch $(STAMP)

clean:
	rm -rf $(VENV) workdirs
