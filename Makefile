# Thin wrapper over scripts/ and CMake. Quick start: `make demo`, `make test`.
BUILD ?= build
JOBS  ?= $(shell nproc)
QUICK ?=

.PHONY: all setup corpora build test demo bench bench-forgetting bench-scaling bench-long bench-pool bench-pool-16m bench-rowcache format clean

all: build

setup:
	@bash scripts/setup.sh

corpora: setup
	@bash scripts/corpora.sh kjv

$(BUILD)/build.ninja: CMakeLists.txt | setup
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null

build: setup $(BUILD)/build.ninja
	@cmake --build $(BUILD) -j $(JOBS)

test: build corpora
	@cd $(BUILD) && ctest --output-on-failure -j 1

# Formats every C, C++ and CUDA source in place with .clang-format (Debian's clang-format).
format:
	@command -v clang-format >/dev/null || { echo "make format needs clang-format: apt-get install clang-format"; exit 1; }
	@git ls-files '*.cc' '*.h' '*.cu' '*.cuh' | xargs clang-format -i

# The main job: peerd learns a broad base, then six text domains one after another, an expert
# segment per domain, each frozen when its domain is trained; prints the forgetting matrix and
# metrics and writes demo-out/. QUICK=1: small slices (about 3 minutes).
demo: build
	@BUILD=$(BUILD) bash scripts/demo.sh $(if $(QUICK),--quick,)

bench: build
	@./$(BUILD)/peer-bench layer
	@./$(BUILD)/peer-bench store
	@./$(BUILD)/peer-bench ingest

# The six continual-learning policies on the six domains after a broad base phase
# (bench/FORGETTING.md; about 10 minutes). PICTURE=1 also sweeps the streamed domains' learning
# rate × steps for dense, dense+recipe and routed and draws forgetting against plasticity in
# bench-out/learning-forgetting.svg (about 20 minutes more).
SWEEP_LR ?= 0.001 0.004
SWEEP_STEPS ?= 75 300
bench-forgetting: build
	@bash scripts/corpora.sh all
	@./$(BUILD)/peer-bench forgetting
ifeq ($(PICTURE),1)
	@mkdir -p bench-out/sweep
	@for lr in $(SWEEP_LR); do for steps in $(SWEEP_STEPS); do \
	  echo "sweep: lr $$lr, $$steps steps per domain"; \
	  ./$(BUILD)/peer-bench forgetting --policies dense,dense+recipe,routed --stream-lr $$lr --steps $$steps \
	    --quiet --json-out bench-out/sweep/lr$${lr}_steps$${steps}.jsonl > /dev/null || exit 1; \
	done; done
	@python3 scripts/forgetting_picture.py bench-out/learning-forgetting.svg bench-out/forgetting.json bench-out/sweep/*.jsonl
endif

# The long stream (bench/LONG.md): twelve real domains after the base phase, 1,000 steps each;
# dense and dense+recipe (at 0.5×, 1× and 2× the matched width on seed 1), routed and routed+recipe
# routing as peerd does (and by the bigram router alone: POLICY/bigram); three seeds. Writes
# bench/LONG.md's tables, bench/long.svg and bench/long-curves.svg. About 2 h on 2 cores (estimated from its runs'
# parts): JOBS seeds at once, one compute thread each (the figures do not depend on it).
bench-long: build
	@JOBS=$(JOBS) bash scripts/long_stream.sh $(BUILD)

# A lifetime of frozen segments: training cost at 1 and 1,024 segments, open time, row cache,
# the router among a branch per segment on the domains' text (bench/POOL.md; about 3 minutes).
bench-pool: build
	@bash scripts/corpora.sh all
	@for s in 1 64 256 1024; do ./$(BUILD)/peer-bench pool --segments $$s --cache-mb 1,16 --json-out bench-out/pool-$$s.json || exit 1; done

# The row cache against the access skew of a freeze-grow stream of six domains, three seeds
# (bench/POOL.md; about 15 minutes).
bench-rowcache: build
	@bash scripts/corpora.sh all
	@./$(BUILD)/peer-bench rowcache --seeds 1,2,3 --json-out bench-out/rowcache.json

# The issue's large pool: 16M experts of D 256 (17 GB of bf16 rows in RocksDB, and 17 GB of memory
# for the resident side), built once under cached residency, then trained resident and under a
# 256 MB row cache in one process, and cached again from a cold page cache in a 1.5 GB memory
# cgroup — a pool ten times larger than its memory (root; bench/POOL.md; about 12 minutes).
POOL16M ?= /tmp/peer-bench-pool-16m
bench-pool-16m: build
	@bash scripts/corpora.sh all
	@./$(BUILD)/peer-bench pool --segments 256 --experts 16777216 --d-model 256 --skip-resident --cache-mb 256 \
	    --steps 4 --reps 1 --dir $(POOL16M) --keep --json-out bench-out/pool-16m-build.json
	@./$(BUILD)/peer-bench pool --segments 256 --experts 16777216 --d-model 256 --reuse --dir $(POOL16M) \
	    --cache-mb 256 --steps 40 --reps 3 --json-out bench-out/pool-16m.json
	@scripts/with_memory_limit.sh 1536M ./$(BUILD)/peer-bench pool --segments 256 --experts 16777216 --d-model 256 \
	    --reuse --skip-resident --cold --dir $(POOL16M) --cache-mb 256 --steps 40 --reps 3 \
	    --json-out bench-out/pool-16m-limited.json
	@rm -rf $(POOL16M)

# Data-parallel training: 1, 2, 4 ranks of one thread beside one process (bench/SCALING.md; ~4 minutes).
bench-scaling: build corpora
	@./$(BUILD)/peer-bench scaling

clean:
	rm -rf $(BUILD)
