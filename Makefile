# Two commands do all the set-up on a fresh machine:
#   make demo   # creates .venv if missing, installs, runs the main job on the built-in demo dataset
#   make test   # same install, runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Two pytest-xdist workers, one per core of the 2-core development machine; tests/conftest.py groups the tests
# (each module on one worker, every module that starts Ray on the same one).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# The quick sweep on the built-in demo dataset, then a short final training of its best trial.
DEMO := demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(PY) -m sweep.run --space search_spaces/quick.yaml --trials 4 --name $(DEMO)
	$(PY) -m core.final_train results/$(DEMO)/best.json

clean-venv:
	rm -rf $(VENV)
