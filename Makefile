# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
LOG     = $(VENV)/install.log

.PHONY: demo test bench bench-train gpu-smoke lint clean

# One line while it installs; pip's output goes to $(LOG), whose tail is shown if it fails.
$(STAMP): pyproject.toml
	@echo "installing $(VENV): $(TORCH) (CPU) + mergekit-rl[dev,plot] (a few minutes; log: $(LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@mkdir -p $(VENV)
	@{ $(BIN)/python -m pip install --upgrade pip && \
	   $(BIN)/python -m pip install "$(TORCH)" -e '.[dev,plot]'; } > $(LOG) 2>&1 || \
	  { tail -n 25 $(LOG); echo "install failed; the full log is $(LOG)"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mergekit-rl demo -o demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/trainer_bench.py --threads 1

# One short bf16 run of every trainer and sampler and the weight commands on CUDA (needs a GPU
# torch in $(VENV): make gpu-smoke TORCH=torch). Add DEVICE=cpu to try it without a GPU.
gpu-smoke: $(STAMP)
	$(BIN)/python benchmarks/gpu_smoke.py --device $(or $(DEVICE),cuda)

lint: $(STAMP)
	$(BIN)/ruff check mergekit_rl trainers reasoning_demo tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
