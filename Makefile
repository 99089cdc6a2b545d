# Two commands set everything up on a fresh machine: `make run` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE ?= .state
# The inference gateway's data plane (Rust, standard library only: builds offline).
DATAPLANE := $(BIN)/mlops-gateway-dataplane
DATAPLANE_CRATE := deployer/gateway/dataplane
CARGO_FLAGS := --offline --manifest-path $(DATAPLANE_CRATE)/Cargo.toml --target-dir $(VENV)/cargo-target

.PHONY: install run test test-fast lint bench bench-quick debian-tools clean

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PY) not found)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

$(DATAPLANE): $(STAMP) $(DATAPLANE_CRATE)/Cargo.toml $(wildcard $(DATAPLANE_CRATE)/src/*.rs)
	@command -v cargo >/dev/null 2>&1 || { echo "Rust's cargo is required to build the gateway's data plane ($(DATAPLANE_CRATE)): https://rustup.rs"; exit 1; }
	cargo build --quiet --release $(CARGO_FLAGS)
	install -m 755 $(VENV)/cargo-target/release/mlops-gateway-dataplane $@

install: $(STAMP) $(DATAPLANE)

# Debian packages some tests need (Playwright's browser download does not work offline; promtool and
# Prometheus for the monitoring rules): installed when root, else the tests that need them skip, saying why.
DEBIAN_TOOLS = chromium:/usr/bin/chromium prometheus:/usr/bin/promtool
debian-tools:
	@for pair in $(DEBIAN_TOOLS); do pkg=$${pair%%:*}; bin=$${pair#*:}; \
	  if [ ! -x $$bin ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get install -y -qq $$pkg >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $$pkg >/dev/null)) \
	        || echo "could not install $$pkg: the tests that need it will be skipped"; \
	    else echo "$$pkg not installed and not root: the tests that need it will be skipped"; fi; \
	  fi; \
	done

run: install
	$(BIN)/python -m config.stack --state $(STATE) run

test: install debian-tools
	cargo test --quiet --release $(CARGO_FLAGS)
	$(BIN)/python -m config.stack --state $(STATE)/test exec --fresh -- $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	cargo clippy --quiet --release $(CARGO_FLAGS) --all-targets -- -D warnings
	$(BIN)/python -m config.stack --state $(STATE)/lint exec -- $(BIN)/mypy

# Benchmarks print a table and one JSON line each; bench.engines needs no servers.
# bench.chaos starts a whole platform of its own (config.stack run) under the state folder it is given.
bench: install
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.registry
	$(BIN)/python -m bench.engines
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.gateway
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.rollback
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.decisions
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.drift
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.hil
	$(BIN)/python -m bench.chaos --state $(STATE)/bench/chaos

bench-quick: install
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.registry --quick
	$(BIN)/python -m bench.engines --quick
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.gateway --quick
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.rollback --quick
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.decisions --quick
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.drift --quick
	$(BIN)/python -m config.stack --state $(STATE)/bench exec --fresh -- $(BIN)/python -m bench.hil --quick
	$(BIN)/python -m bench.chaos --quick --state $(STATE)/bench/chaos

clean:
	rm -rf $(STATE)/test $(STATE)/bench $(STATE)/lint
