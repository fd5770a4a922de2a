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

# `make run`: generate from a small random Llama checkpoint (built once under .cache/), or from a real Hugging Face
# folder with `make run MODEL=path/to/model`; on the GPU when this python has CuPy and sees one (run from the
# checkout, as gpu-test), else on the CPU in the virtualenv. PROMPT, TOKENS and ARGS (more `generate` options) too.
MODEL ?=
PROMPT ?= Once upon a time
TOKENS ?= 64
ARGS ?=
RUN_ARGS = generate $(if $(MODEL),--model "$(MODEL)") --prompt "$(PROMPT)" --max-new-tokens $(TOKENS) $(ARGS)
run:
	@if $(PYTHON) -c "import cupy, ml_dtypes; assert cupy.is_available()" >/dev/null 2>&1; then \
		PYTHONPATH=. $(PYTHON) -m tessera_cp.cli $(RUN_ARGS); \
	else \
		$(MAKE) --no-print-directory $(VENV)/.installed && $(VPY) -m tessera_cp.cli $(RUN_ARGS); \
	fi

test: $(VENV)/.installed
	$(VPY) -m pytest -q tests

gpu-test:
	PYTHONPATH=. $(PYTHON) -m pytest -q -m gpu tests

bench:
	PYTHONPATH=. $(PYTHON) -m pytest -q bench --benchmark-columns=median,min,max --benchmark-sort=name

clean:
	rm -rf $(VENV) build *.egg-info
