# make test: create .venv (once), install the pinned set, run the test suite on an 8-device CPU mesh.
# make demo: create .venv (once), install, run the demo on the embedded tiny default and print its outputs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: test demo clean

$(INSTALLED): setup.py constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(INSTALLED)

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q -o faulthandler_timeout=1200 --durations=30 tests

demo: $(INSTALLED)
	$(VENV)/bin/python -m teacherlm_jax.demo --out outputs/demo

clean:
	rm -rf $(VENV) outputs
