# Two entry points: `make demo` and `make test`. Both set up `.venv` first (once; quick when already done).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench help-docs clean

install: $(STAMP)

# Re-runs only when requirements.txt or pyproject.toml changes; a half-finished install leaves no stamp and is redone.
# The repository itself is installed in editable mode (pyproject.toml) as `models`, `diffusion` and `fpdm`, so every
# script, benchmark and experiment imports them without touching sys.path. The scripts are files, not installed.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# pytest exits 5 when it collected no test: that fails here like any other error. The suite runs on up to 4 cores
# (pytest-xdist; every test is single-threaded, see tests/conftest.py): TEST_WORKERS=1 runs it in one process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; exit $$rc

demo: install
	$(PY) demo.py

# docs/<script>-help.txt: each script's --help at 120 columns (tests/test_help_docs.py fails when one is stale).
HELP_SCRIPTS := train sample sample_ddp evaluate extract_features export invert
help-docs: install
	for s in $(HELP_SCRIPTS); do COLUMNS=120 $(PY) $$s.py --help > docs/$$s-help.txt || exit 1; done

# Every benchmark and one table of ratios, e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--device cuda".
bench: install
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
