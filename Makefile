# dgconvert — `make test` and `make demo` work from a fresh clone (they create .venv).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
DATA_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo data clean gpu-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[export,plot,dev,serve]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST comes from Debian's package; installs it when missing (needs root).
data:
	@test -f $(DATA_DIR)/t10k-images-idx3-ubyte.gz || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# Tests run in random order (pytest-randomly); the seed is printed so a failure can be
# replayed: make test SEED=1234
test: $(STAMP) data
	@seed=$${SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "pytest-randomly seed: $$seed (replay: make test SEED=$$seed)"; \
	$(BIN)/python -m pytest -q --randomly-seed=$$seed

lint: $(STAMP)
	$(BIN)/ruff check dgconvert tests benchmarks

# The main job end to end on the CPU. The backbone is trained on train[:50000] (cached);
# gates are fitted on the same part; thresholds are calibrated on train[50000:], which
# neither the backbone nor the gates saw; predict and bench use the test set. The gates pool
# each map over a 2x2 grid (--pool grid2): measured in benchmarks/results/gate_pooling.md.
DG := $(BIN)/dgconvert
demo: $(STAMP) data
	$(DG) train-reference --data 'fashion-mnist:train[:50000]' -o $(OUT)/backbone.pt
	$(DG) gates fit $(OUT)/backbone.pt --cut layer1,layer2,layer3 --pool grid2 \
	    --data 'fashion-mnist:train[:50000]' -o $(OUT)/gated.pt --force
	$(DG) export $(OUT)/gated.pt -o $(OUT)/reference.dg --force --data 'fashion-mnist:test[:512]'
	$(DG) calibrate $(OUT)/reference.dg --data 'fashion-mnist:train[50000:]' --max-drop 0.3 \
	    --json $(OUT)/calibration.json --plot $(OUT)/frontier.png
	$(DG) predict $(OUT)/reference.dg --data fashion-mnist:test
	$(DG) info $(OUT)/reference.dg
	$(DG) bench $(OUT)/reference.dg --data fashion-mnist:test --model $(OUT)/gated.pt \
	    --batch-size 1,8,64,256 --staging-overhead --json $(OUT)/bench.json --plot $(OUT)/bench.png

# The GPU path on a GPU machine (no venv or network needed there): the CUDA layer against
# numpy with the real cuda-bindings, TensorRT's gpu tests and onnxruntime-gpu when installed;
# each missing piece is a reported skip (exit 0 without a GPU). Report: $(OUT)/gpu_check.md.
GPU_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	PYTHONPATH=. $(GPU_PY) benchmarks/gpu_check.py --out $(OUT)/gpu_check.md

clean:
	rm -rf $(OUT) .pytest_cache
