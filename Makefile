# Thin wrapper over scripts/ and CMake. Quick start: `make demo`, `make test`.
BUILD ?= build
JOBS  ?= $(shell nproc)
QUICK ?=

.PHONY: all setup corpora build test demo bench bench-forgetting bench-scaling clean

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

# The main job: peerd learns six text domains one after another, an expert segment per domain,
# each frozen when its domain is trained; prints the forgetting matrix and metrics and writes
# demo-out/. QUICK=1: small slices (about 3 minutes).
demo: build
	@BUILD=$(BUILD) bash scripts/demo.sh $(if $(QUICK),--quick,)

bench: build
	@./$(BUILD)/peer-bench layer
	@./$(BUILD)/peer-bench store
	@./$(BUILD)/peer-bench ingest

# The six continual-learning policies on the six domains after a broad base phase
# (bench/FORGETTING.md; about 10 minutes).
bench-forgetting: build
	@bash scripts/corpora.sh all
	@./$(BUILD)/peer-bench forgetting

# Data-parallel training: 1, 2, 4 ranks of one thread beside one process (bench/SCALING.md; ~4 minutes).
bench-scaling: build corpora
	@./$(BUILD)/peer-bench scaling

clean:
	rm -rf $(BUILD)
