# Two commands set up a fresh machine: `make run` and `make test`.
# `make gpu-test` and `make bench` run on a GPU machine straight from the checkout, installing nothing.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: run test gpu-test bench clean

$(VENV)/.installed: setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,mpi]'
	touch $@

run: $(VENV)/.installed
	$(VPY) examples/transformer_block.py

test: $(VENV)/.installed
	$(VPY) -m pytest -q tests

gpu-test:
	PYTHONPATH=. $(PYTHON) -m pytest -q -m gpu tests

bench:
	PYTHONPATH=. $(PYTHON) -m pytest -q bench --benchmark-columns=median,min,max --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info
