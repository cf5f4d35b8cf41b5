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

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m core.train --out results/demo-run --set image_size=48 --set epochs=4 --set pretrained=none

clean-venv:
	rm -rf $(VENV)
