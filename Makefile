# unimllm — `make demo` (install + the main job on the built-in shapes world) and `make test`.
# Every target installs first, so both work on a fresh machine with nothing installed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# CPU machines pin the local CPU torch wheel; machines with a CUDA GPU resolve torch freely.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
CONSTRAINTS := $(if $(filter 0,$(HAS_GPU)),-c constraints/cpu.txt,)
STAMP  := $(VENV)/.installed-$(HAS_GPU)
RUNS   ?= runs
# make demo DEVICE=cuda runs the chain on a GPU with the `small` presets (launch/configs/stage*/small.yaml).
# `make stage2` trains longer than the demo's stage 2 (tiny.yaml: 1200 steps, what the 15-minute demo affords).
STAGE2_STEPS ?= 3400
DEVICE ?= $(if $(filter 1,$(HAS_GPU)),cuda,cpu)
# Threads: never more than the cores we have (oversubscribing 2 cores made a prototype 8x slower).
NPROC  := $(shell nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS ?= $(NPROC)
export WANDB_MODE ?= offline

.PHONY: install test lint demo shapes teacher stage1 stage2 stage3 eval bench clean

install: $(STAMP)

# --no-compile: pip would byte-compile every installed file (29 s of a 66 s install here); Python compiles
# the few thousand modules a run imports on first use instead.
$(STAMP): pyproject.toml constraints/cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile $(CONSTRAINTS) -e ".[dev]"
	@$(PY) -c "import importlib.util, sys; sys.exit('torchvision is installed: unimllm must not depend on it' if importlib.util.find_spec('torchvision') else 0)"
	@if [ "$(HAS_GPU)" = 0 ]; then $(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v == '2.13.0+cpu' else 'expected torch 2.13.0+cpu on a CPU machine, got ' + v)"; fi
	@touch $(STAMP)

# pytest exits 5 when it collects no test: that is a failure too, and said so.
test: install
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected -- failing" >&2; fi; exit $$rc

lint: install
	$(BIN)/ruff check .

# The main job on the built-in default: shapes shards -> stage 1 -> codes -> stage 2 -> stage 3 -> shapes eval,
# timed, ending in one results table (runs/demo/demo.md). Each step is one process with one thread per core.
# AVX2=1 runs it as on a plain AVX2 CPU without native bf16 (most laptops and VMs; launch/demo.py --emulate_avx2).
demo: install
	$(PY) launch/demo.py --runs $(RUNS)/demo --device $(DEVICE) $(if $(AVX2),--emulate_avx2,)

shapes: install
	$(PY) -m data.shapes --out $(RUNS)/shapes/demo --n 4000 --n_val 500 --level demo

# The shapes world's semantic teacher (launch/teacher.py, ~1 CPU-minute): what stage 1's semantic decoder regresses.
teacher: install
	@test -f $(RUNS)/shapes/demo/manifest.json || $(MAKE) shapes
	$(PY) launch/teacher.py --config launch/configs/teacher/shapes.yaml --run.out_dir $(RUNS)/teacher/shapes --train.threads $(NPROC)

# Stage 1 (tokenizer) on the shapes world, tiny preset, CPU; builds the shards and the teacher first if absent.
stage1: install
	@test -f $(RUNS)/shapes/demo/manifest.json || $(MAKE) shapes
	@test -f $(RUNS)/teacher/shapes/export/teacher/model.safetensors || $(MAKE) teacher
	$(PY) launch/stage1.py --config launch/configs/stage1/tiny.yaml --run.out_dir $(RUNS)/stage1/tiny --train.threads $(NPROC) \
		--model.teacher.pretrained $(RUNS)/teacher/shapes/export/teacher

# Stage 2 (one unified LLM) on the shapes world, tiny preset, CPU: the stage-1 tokenizer (built if absent),
# its codes precomputed into runs/shapes/demo/codes (resumable; redone when the tokenizer changed), then training.
stage2: install
	@test -f $(RUNS)/stage1/tiny/export/tokenizer/model.safetensors || $(MAKE) stage1
	$(PY) -m unimllm.stages.precompute_codes --tokenizer $(RUNS)/stage1/tiny/export/tokenizer --no_progress \
		--shards "$(RUNS)/shapes/demo/train/shapes-train-{000000..000003}.tar" --out $(RUNS)/shapes/demo/codes
	$(PY) launch/stage2.py --config launch/configs/stage2/tiny.yaml --run.out_dir $(RUNS)/stage2/tiny --train.threads $(NPROC) \
		--train.steps $(STAGE2_STEPS) \
		--model.tokenizer $(RUNS)/stage1/tiny/export/tokenizer \
		--data.sources.0.shards "$(RUNS)/shapes/demo/codes/shapes-train-{000000..000003}.tar" \
		--val.shards $(RUNS)/shapes/demo/val/shapes-val-000000.tar \
		--val.geneval_prompts $(RUNS)/shapes/demo/val/geneval_prompts.jsonl

# The shapes evaluation suite (recon, shapes-MME, shapes-GenEval with its shuffled-prompt control) on the
# stage-2 demo checkpoint (built first if absent); writes runs/stage2/tiny/eval/shapes/{report.md,scores.json,...}.
eval: install
	@test -f $(RUNS)/stage2/tiny/export/unified/unified_config.json || $(MAKE) stage2
	@# a new checkpoint starts a fresh report (the GenEval layout resumes only for the same checkpoint and sampler)
	@if [ $(RUNS)/stage2/tiny/eval/shapes/report.md -ot $(RUNS)/stage2/tiny/export/unified/unified_config.json ]; then \
		rm -rf $(RUNS)/stage2/tiny/eval/shapes; fi
	$(PY) launch/evaluate.py --config launch/configs/eval/shapes.yaml --ckpt $(RUNS)/stage2/tiny/export/unified \
		--out $(RUNS)/stage2/tiny/eval/shapes --shapes.shards $(RUNS)/shapes/demo/val/shapes-val-000000.tar \
		--shapes.geneval_prompts $(RUNS)/shapes/demo/val/geneval_prompts.jsonl

# Stage 3 (instruction tuning, full fine-tuning for the tiny random-init LLM) from the `make stage2` export.
stage3: install
	@test -f $(RUNS)/stage2/tiny/export/unified/unified_config.json || $(MAKE) stage2
	$(PY) launch/stage3.py --config launch/configs/stage3/tiny.yaml --run.out_dir $(RUNS)/stage3/tiny --train.threads $(NPROC) \
		--init_from $(RUNS)/stage2/tiny/export/unified \
		--data.sources.0.shards "$(RUNS)/shapes/demo/codes/shapes-train-{000000..000003}.tar" \
		--val.shards $(RUNS)/shapes/demo/val/shapes-val-000000.tar \
		--val.geneval_prompts $(RUNS)/shapes/demo/val/geneval_prompts.jsonl

bench: install
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(RUNS) .pytest_cache .ruff_cache
