# The README names two commands: `make demo` and `make test`. Both create .venv with uv when missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never
# OpenMP threads sleep while they wait instead of spinning: on a CPU shared with other jobs or with the
# DataLoader workers, spinning intra-op threads made a training step 4.5x slower (BENCHMARKS.md, Training loop).
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONUNBUFFERED := 1

.PHONY: install lock demo test test-fast bench clean

# The exact tested versions (requirements.lock), then the package itself without resolving again.
$(VENV)/.installed: setup.cfg pyproject.toml requirements.lock
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@test -x $(PY) || uv venv --quiet --python 3.11 $(VENV)
	uv pip install --quiet --python $(PY) -r requirements.lock
	uv pip install --quiet --python $(PY) --no-deps -e .
	@touch $@

install: $(VENV)/.installed

# Re-resolve requirements.lock from setup.cfg's ranges (+ the test extra), keeping its versions where
# they still fit; `make lock UPGRADE=--upgrade` moves every package to the newest version in range.
lock:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	uv pip compile setup.cfg --extra test --universal --python-version 3.11 $(UPGRADE) \
		--custom-compile-command "make lock" -o requirements.lock

demo: install
	$(VENV)/bin/crowdseg fit experiments/p2p/synthetic.yaml

# One pytest worker per core (pytest-xdist); a test file stays on one worker, so its module fixtures
# (e.g. the uninterrupted reference run of tests/test_exact_resume.py) are built once.
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/dpmo.py

clean:
	rm -rf $(VENV) runs
