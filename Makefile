# One entry point for a fresh machine: `make demo` and `make test` install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/mmclip train experiment=shapes_tiny

test: install
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: install
	$(PY) -m ruff check mmclip tests benchmarks

bench: install
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_retrieval.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_lit_cache.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
