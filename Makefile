# chat-ha: the commands a developer and CI need.
#
#   make run     install what is missing, build, start the local topology
#                (Redis, 2 frontends, 2 backends, HAProxy on :8080)
#   make test    install what is missing and run every test tier
#
SHELL := /bin/bash
CARGO ?= cargo
APT_PACKAGES := redis-server haproxy systemd curl chromium fonts-dejavu-core
export CHAT_HA_BIN_DIR := $(CURDIR)/target/debug

.PHONY: all build deps deps-apt deps-node deps-npm run test test-rust test-e2e test-browser lint

all: build

build:
	$(CARGO) build --bins

# Debian packages the project needs at run and test time.
deps-apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Node.js 20 or later runs the test clients and `make run`'s launcher.
deps-node:
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null || \
	  { echo "Node.js 20 or later is needed (node and npm on PATH)" >&2; exit 1; }

# The JavaScript test clients, exactly as locked.
deps-npm: deps-node
	cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error

deps: deps-apt deps-npm

run: deps-apt deps-node build
	node tests/e2e/run.mjs --port 8080 --log-dir $(CURDIR)/target/run-logs

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test-rust: deps-apt
	$(CARGO) test --workspace --all-targets

test-e2e: deps build
	cd tests/e2e && node --test --test-concurrency=1 --test-reporter=spec

# The chat page in headless Chromium, across two domains.
test-browser: deps build
	cd tests/browser && node --test --test-concurrency=1 --test-reporter=spec

test: lint test-rust test-e2e test-browser
