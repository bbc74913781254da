# Set-up and everyday commands. `make demo` and `make test` create .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# A Python >= 3.12: python3.12 on PATH, else pyenv's newest 3.12/3.13.
PYTHON ?= $(shell command -v python3.12 || (command -v pyenv >/dev/null && for v in 3.12 3.13; do p=$$(pyenv root)/versions/$$(pyenv versions --bare | grep -E "^$$v(\.|$$)" | tail -1)/bin/python; [ -x "$$p" ] && echo $$p && break; done))
TEST_ARGS ?=

.PHONY: venv demo test clean-venv

$(VENV)/.installed: setup.cfg pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "No Python >= 3.12 found: install python3.12 or 'pyenv install 3.12', or run make PYTHON=/path/to/python3.12" >&2; exit 1; fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m megatron_prolong.train run.dir=outputs/demo-$$(date +%Y%m%d-%H%M%S)

test: venv
	$(PY) -m pytest $(TEST_ARGS)

clean-venv:
	rm -rf $(VENV)
