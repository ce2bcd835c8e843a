# `make demo` and `make test` do all set-up on a fresh machine: create .venv, install, run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of torch unless a GPU is present (the CPU wheel avoids a multi-GB CUDA download).
TORCH_INDEX := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || echo --extra-index-url https://download.pytorch.org/whl/cpu)
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test install clean mlflow-ui quality reference zoo

$(BIN)/patchflow: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q $(TORCH_INDEX) torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(BIN)/patchflow

# The demo's shards: the "dog" preset (pipeline.data.synthetic.NAMED_MIXES): DoG frames upright, oriented
# and rotated, detector-like and HPatches-hard jitter, one scale-space search per photograph.
demo: install
	@start=$$(date +%s); \
	$(BIN)/patchflow shards synthetic --out shards --train-pairs 120000 --train-mix dog --eval-mix dog && \
	$(BIN)/patchflow sweep --config configs/sweeps/demo.yaml && \
	echo "[patchflow] demo wall time: $$(( $$(date +%s) - start )) s; browse runs with: make mlflow-ui"

# After `make demo`: every registered architecture's FPR95 on the synthetic eval split and on real
# Oxford graf pairs, with SIFT (issue 7's table) and OpenCV's baselines (the [baselines] extra).
quality: install
	$(BIN)/python -m pip install -q -e ".[baselines]"
	$(BIN)/python benchmarks/quality.py

# Issue 17's table: every trainable architecture trained through the pipeline on the same synthetic
# shards with the same number of pairs (98,304 = 768 steps of 128 each, every pair distinct), FPR95 on
# 20,000 synthetic eval pairs (4000 left intervals as wide as the gaps between models) and on graf with
# SIFT. Runs train side by side, one per CPU (zoo.py --parallel): 74 min on a 2-core AVX2-only Zen 3 VM
# (2026-12-07); one at a time it took 22 min on a 2-core AMX Xeon and 53 min on an AVX-512 one without AMX,
# before the towers' last layer became a GEMM (HardNet8 2x faster on AVX2); benchmarks/README.md has the
# figures. ZOO_ARGS shrinks it on a busy machine, e.g.
# make zoo ZOO_ARGS="--pairs 1024 --batch-size 128 --graf-pairs 2000".
ZOO_SHARDS ?= shards-zoo
ZOO_ARGS ?= --pairs 98304 --batch-size 128 --eval-pairs 20000
# The shards are always (re)generated (~35 s): shards left by an older generator would be reused otherwise,
# and the writer rewrites only the shards whose bytes changed.
zoo: install
	$(BIN)/patchflow shards synthetic --out $(ZOO_SHARDS) --train-pairs 120000 --eval-pairs 20000
	nice -n 10 $(BIN)/python benchmarks/zoo.py $(ZOO_SHARDS) $(ZOO_ARGS)

# Issue 13's reference run (about an hour on 2 CPU cores; configs/sweeps/reference.yaml): more pairs of
# the demo's varied construction, HardNet for 45 min, then graf cut by every construction with the baselines.
REFERENCE_SET ?=
reference: install
	$(BIN)/python -m pip install -q -e ".[baselines]"
	@start=$$(date +%s); \
	$(BIN)/patchflow shards synthetic --out shards-reference --train-pairs 400000 --train-mix varied --eval-mix varied && \
	$(BIN)/patchflow sweep --config configs/sweeps/reference.yaml $(REFERENCE_SET) && \
	$(BIN)/patchflow evaluate --images data/oxford_graf --model models:/patchflow-reference-hardnet@champion && \
	echo "[patchflow] reference wall time: $$(( $$(date +%s) - start )) s"

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=25 tests  # 2 processes: see tests/conftest.py

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf shards shards-reference runs mlflow.db mlartifacts shards-zoo
