# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test bench bench-train lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install "$(TORCH)" -e '.[dev,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mergekit-rl demo -o demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/trainer_bench.py --threads 1

lint: $(STAMP)
	$(BIN)/ruff check mergekit_rl trainers tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
