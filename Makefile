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

# Two pytest-xdist workers, one per core of the 2-core development machine; each test module runs whole on one
# worker (--dist loadfile), so that its module-scoped fixtures (a trained run, a sweep) are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The quick sweep on the built-in demo dataset, then a short final training of its best trial.
DEMO := demo-$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(PY) -m sweep.run --space search_spaces/quick.yaml --trials 4 --name $(DEMO)
	$(PY) -m core.final_train results/$(DEMO)/best.json

clean-venv:
	rm -rf $(VENV)
