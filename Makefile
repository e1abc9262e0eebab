# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= .cache/demo/qwen2-zero3-bf16

.PHONY: setup setup-vllm setup-llmc setup-megatron setup-megatron-next setup-azurite setup-nemo check-nemo lock demo test test-unit lint bench

setup:
	@scripts/bootstrap.sh

setup-vllm:
	@scripts/setup_vllm_venv.sh

# llm-compressor in its own venv (.venv-llmc): the anchor tests/test_quantize.py compares --quantize with.
setup-llmc:
	@scripts/setup_llmc_venv.sh

# megatron-core (CPU) in its own venv, used only to write the Megatron test corpus (tests/corpus/megatron_build.py).
setup-megatron:
	@scripts/setup_megatron_venv.sh

# megatron-core 0.19 (no common.pt: the common state inside the .distcp) laid over .venv-megatron, for one case.
setup-megatron-next: setup-megatron
	@scripts/setup_megatron_next.sh

# Azurite (Azure Storage emulator, Node.js) in .cache/azurite, pinned by constraints/azurite/package-lock.json:
# the az:// endpoint of tests/test_azure.py. See scripts/setup_azurite.sh.
setup-azurite:
	@scripts/setup_azurite.sh

# nemo_toolkit 2.7.3 + megatron-core (CPU) in its own venv, used only to write the NeMo 2 case (tests/corpus/nemo_build.py).
setup-nemo:
	@scripts/setup_nemo_venv.sh

# The real NeMo 2 save (weights/ + context/) converted bit for bit, config and tokenizer from context/. Not part of
# `make test`: the venv's set-up alone does not fit the CI budget (see tests/corpus/nemo_check.py).
check-nemo: setup setup-nemo
	$(PY) -m tests.corpus.nemo_check

# Re-pin the test environments: freeze $(VENV) and .venv-vllm (VLLM_VENV), once their tests pass, into
# constraints/test.txt and constraints/vllm.txt, which setup and setup-vllm install with. See scripts/lock.sh.
lock:
	@VENV=$(VENV) scripts/lock.sh

# Consolidate a small real ZeRO-3 checkpoint (generated once with real DeepSpeed, then cached).
demo: setup
	@DEMO_OUT=$(DEMO_OUT) $(PY) -m tests.corpus.demo

# Everything: lint (ruff + the import-linter layers contract), then every test. pytest's first line names the
# versions it runs with (tests/conftest.py), pinned by constraints/*.txt. Two pytest-xdist workers, each taking whole
# test files (--dist loadfile: a file's module fixtures, e.g. one converted folder or one Ray cluster, are built once);
# the corpus builders share their cache under a file lock. --durations lists the 30 slowest steps at the end.
test: setup setup-vllm setup-llmc setup-megatron setup-megatron-next setup-azurite lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30

# The fast layer alone (pure logic, no corpus, no torch): well under 30 s.
test-unit: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(VENV)/bin/ruff check src tests train bench
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) bench/run.py
