# dgconvert — `make test` and `make demo` work from a fresh clone (they create .venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
DATA_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo data clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[export,plot,dev]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST comes from Debian's package; installs it when missing (needs root).
data:
	@test -f $(DATA_DIR)/t10k-images-idx3-ubyte.gz || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

test: $(STAMP) data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dgconvert tests benchmarks

demo: $(STAMP) data
	$(BIN)/python -m dgconvert.demo --out $(OUT)

clean:
	rm -rf $(OUT) .pytest_cache
