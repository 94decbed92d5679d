# Two entry points: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed

export OMP_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

.PHONY: demo test test-slow lint bench clean tools images

$(DEPS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned: this release's CPU wheel; anything unpinned pulls a CUDA build
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,embed,operator]"
	touch $@

demo: $(DEPS)
	$(BIN)/driftless demo

# Debian's prometheus package: promtool checks /metrics and the alert rules, and a real
# Prometheus runs the dashboard test
tools:
	@{ command -v promtool && command -v prometheus; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }
	@# Debian's kubernetes-client: kubectl runs the install walkthrough against the emulator
	@command -v kubectl >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq kubernetes-client >/dev/null; }

# The three images built and started without a daemon or a container registry (buildah, chroot
# isolation, a debootstrap base cached in .driftless/images; installs buildah and debootstrap
# from Debian if absent): sizes and start checks in bench/results/images.md
# IMAGES_ARGS: e.g. --targets runtime operator (CI: the jobs image's torch layers take ~30 min
# on 2 cores with buildah's vfs driver; `make images` alone builds all three)
IMAGES_ARGS ?=
images: $(DEPS)
	$(BIN)/python tools/images.py $(IMAGES_ARGS)

# The README's story on a local cluster of real processes (tests/cluster/: the chart, the
# operator and every pod it creates as processes in their own network namespaces, moto S3 and
# Prometheus on their own addresses); needs root. CLUSTER_DEMO_ARGS: e.g. "--docs 240 --keep"
.PHONY: cluster-demo test-slow test-slow-core test-slow-cluster
CLUSTER_DEMO_ARGS ?=
cluster-demo: $(DEPS) tools
	$(BIN)/python -m tests.cluster.demo $(CLUSTER_DEMO_ARGS)

lint: $(DEPS)
	$(BIN)/ruff check index_runtime index_operator tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports

CLUSTER_TESTS = tests/integration/test_cluster_*.py
CLUSTER_LOG = .driftless/cluster-tests.log
test: lint tools
	@echo "== unit suite"; $(BIN)/python -m pytest tests/unit -q -m "not slow" -p no:cacheprovider
	@# the local-cluster tests (the README story, the sharded index; mostly waiting on their
	@# pods) run beside the rest of the integration suite: their output follows it
	@mkdir -p .driftless; echo "== integration suite (local directory and S3 via moto; the local-cluster tests beside it, log $(CLUSTER_LOG))"; \
	$(BIN)/python -m pytest $(CLUSTER_TESTS) -q -m "not slow" -p no:cacheprovider --durations=5 > $(CLUSTER_LOG) 2>&1 & cluster=$$!; \
	$(BIN)/python -m pytest tests/integration -q -m "not slow" -p no:cacheprovider --ignore-glob='$(CLUSTER_TESTS)' --durations=10; rest=$$?; \
	wait $$cluster; rc=$$?; echo "== integration suite: the local-cluster tests"; cat $(CLUSTER_LOG); \
	[ $$rest -eq 0 ] && [ $$rc -eq 0 ]

# test-slow = test-slow-core (one process: crash points, campaigns, fuzz) + test-slow-cluster
# (the local cluster: its harness tests and the chaos campaign, two migrations, ~22 min; needs root)
test-slow: test-slow-core test-slow-cluster

test-slow-core: $(DEPS)
	@echo "== slow suite (migration crash points and campaign, operator restarts, random-kill and storage-fault campaigns, long API fuzz)"; $(BIN)/python -m pytest tests -q -m slow -p no:cacheprovider --ignore-glob='$(CLUSTER_TESTS)' --durations=10

test-slow-cluster: $(DEPS) tools
	@echo "== slow suite on the local cluster (kubelet and Prometheus harness, the chaos campaign)"; $(BIN)/python -m pytest $(CLUSTER_TESTS) -q -m slow -p no:cacheprovider --durations=10

# Peers in one run (bench/peers.py): Driftless, raw FAISS, LanceDB, Milvus Lite, Chroma, Qdrant
# (local mode), usearch and hnswlib on 1M synthetic rows (d=128) at matched recall@10; each peer
# in its own process. Expect about 3-4 hours on 2 quiet cores: the single-threaded HNSW builds
# (chroma, usearch, hnswlib, Milvus Lite; ~15-30 min each at 1M), LanceDB's and Milvus' slow
# single-query sweeps, and Qdrant's local mode, an exact Python scan (~1 s a query at 1M).
# Writes bench/results/peers/{peers.json,peers.md,peers.png}. PEERS_ARGS: e.g. "--peers driftless,faiss"
PEERS_ARGS ?=
# Shard fan-out (bench/shards.py): 1, 2 and 4 local shard processes at equal total rows,
# latency p50/p99 through the router and QPS; writes bench/results/shards.{json,md,png}
.PHONY: bench-shards
bench-shards: $(DEPS)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/shards.py --rows 100000 --queries 200 --clients 4 --repeats 3

.PHONY: bench-peers
bench-peers: $(DEPS)
	$(BIN)/python -m pip install -q -e ".[bench,peers]"
	$(BIN)/python bench/peers.py --rows 1000000 --queries 1000 --batch 1000 --repeats 3 --out bench/results/peers $(PEERS_ARGS)

bench: $(DEPS)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/store.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/filters.py
	$(BIN)/python bench/view_memory.py
	$(BIN)/python bench/compaction_fixpoint.py --label after
	$(BIN)/python bench/api_body_rss.py --out bench/results/api_body_rss_after
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/backfill_scaling.py

clean:
	rm -rf $(VENV) .driftless
