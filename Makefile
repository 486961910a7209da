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

.PHONY: demo test bench bench-train gpu-smoke lint clean

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
	rm -rf $(VENV) demo_out .pytest_cache
