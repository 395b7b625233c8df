# The two set-up commands are `make demo` and `make test`; each builds .venv from requirements.lock first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GEN_DIR := libs/protos

.PHONY: demo test test-fast lint protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalled whenever the lock file or the package metadata changes.
$(VENV)/.installed: requirements.lock pyproject.toml $(GEN_DIR)/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e $(GEN_DIR) -e .
	touch $@

# Regenerates the Python code for protos/ (python, pyi, grpc), never edited by hand.
protos: $(VENV)/.installed
	rm -rf $(GEN_DIR)/aiprod
	$(BIN)/python -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN_DIR) --pyi_out=$(GEN_DIR) --grpc_python_out=$(GEN_DIR) $(PROTO_FILES)

lint: $(VENV)/.installed
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q -rs --durations=25

# The unit tier: single modules, injected clocks, no processes.
test-fast: lint
	$(BIN)/pytest -q tests/unit

demo: $(VENV)/.installed
	$(BIN)/python -m aiprod_cli.demo

bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .aiprod
