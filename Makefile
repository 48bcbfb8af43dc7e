# `make test` and `make demo` create .venv on first use and install requirements.txt into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo demo-docs bench bench-full gpu-check clean

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

demo: $(VENV)/.installed
	$(BIN)/python demo.py

# The whole demo from scratch at low priority; its summary replaces the demo blocks of README.md and docs/demo.md.
demo-docs: $(VENV)/.installed
	nice -n 10 $(BIN)/python demo.py --overwrite --update-docs

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_encoding.py

bench-full: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_full_scale.py

gpu-check: $(VENV)/.installed
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) demo_data demo_output .pytest_cache
