# One entry point for a fresh machine: `make demo` and `make test` install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench gpu-wheels gpu-bench clean

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

# The GPU suite runs on a GPU machine that has torch, lightning, timm and transformers but no network:
# `make gpu-wheels` (here, with PyPI) puts the rest into .whl/, which travels with the checkout;
# `make gpu-bench` (there) installs them beside the system packages and runs the suite (about 6 minutes).
GPU_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.14 webdataset==1.0.2 braceexpand==0.1.7
GPU_PY ?= python3

gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)

gpu-bench:
	@if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
		--upgrade --target /tmp/mmclip-gpu-site .whl/*.whl; fi
	PYTHONPATH=/tmp/mmclip-gpu-site:$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_suite.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
