# Thin wrapper over scripts/ and CMake. Quick start: `make demo`, `make test`.
BUILD ?= build
JOBS  ?= $(shell nproc)
QUICK ?=

.PHONY: all setup corpora build test demo bench clean

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

# The main job: train the PEER LM on the KJV corpus, freezing the first expert batch and
# growing a fresh one halfway, with progress and held-out bits per byte. QUICK=1: a short run.
demo: build corpora
	@./$(BUILD)/peer-train --corpus data/corpora/kjv $(if $(QUICK),--steps 120 --grow-at 60,--grow-at 300)

bench: build
	@./$(BUILD)/peer-bench layer
	@./$(BUILD)/peer-bench store

clean:
	rm -rf $(BUILD)
