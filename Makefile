# The two commands of the README, plus the codec benchmark. Each installs what it needs first
# (scripts/setup is idempotent and quick when everything is in place).

CARGO ?= cargo
export NVCC ?= $(shell cat .cuda/NVCC_PATH 2>/dev/null)

.PHONY: demo test setup bench-codec bench-cli lint

setup:
	@scripts/setup

# The main job: a Llama-shaped checkpoint, compressed, verified bit for bit, reported.
demo: setup
	$(CARGO) build --release --locked
	$(CARGO) build --release --locked --example triton_core_demo
	scripts/demo

# Everything CI checks: formatting, lints, doc links, unit + integration + property tests.
# The real test model is fetched first (once; a no-op when .cache/smollm2 is complete), and its
# tests fail rather than skip if it is missing.
test: export UNWEIGHT_REQUIRE_TEST_MODEL = 1
# The genuine Triton core (../shared/triton-core; CI always has it): its tests fail, not skip.
test: export UNWEIGHT_REQUIRE_TRITON_CORE = 1
# Every kernel must compile in CI: no nvcc is an error, not a CPU-only build.
test lint: export UNWEIGHT_REQUIRE_NVCC = 1
test: setup lint
	$(CARGO) run --release --locked -- fetch-test-model --out .cache/smollm2
	$(CARGO) test --locked
	d="$$(mktemp -d)" && trap 'rm -rf "$$d"' EXIT && CARGO="$(CARGO)" PREFIX="$$d" docker/build-backend.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --locked --no-deps --lib

# Codec ratio and throughput next to ZipNN on the same bytes, same thread count; writes
# bench/results/codec.json (commit it with the README table when it changes).
bench-codec: setup
	$(CARGO) build --release --locked
	scripts/fetch-minilm .cache/minilm
	target/release/unweight bench codec \
		--zipnn-python "$$(scripts/bench-env)" \
		--minilm .cache/minilm/model.safetensors \
		--out bench/results/codec.json

# The whole compress/decompress commands (file in, file out), formats v2 and v1, next to ZipNN on
# the same tensors; the real test model, a synthetic SmolLM2-shaped checkpoint and MiniLM as BF16.
# Writes bench/results/cli.json (commit it with the README table when it changes).
bench-cli: setup
	$(CARGO) build --release --locked
	$(CARGO) run --release --locked -- fetch-test-model --out .cache/smollm2
	scripts/fetch-minilm .cache/minilm
	target/release/unweight synth --shape smollm2-135m --out target/bench-synth-smollm2 --force
	target/release/unweight bench cli \
		--model .cache/smollm2 --model target/bench-synth-smollm2 \
		--minilm .cache/minilm/model.safetensors \
		--zipnn-python "$$(scripts/bench-env)" \
		--out bench/results/cli.json
