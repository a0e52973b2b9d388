# chat-ha: the commands a developer and CI need.
#
#   make run     install what is missing, build, start the local topology
#                (Redis, 2 frontends, 2 backends, HAProxy on :8080)
#   make test    install what is missing and run every test tier
#
SHELL := /bin/bash
# Every cargo command that resolves crates runs with --locked: the crates of
# the lock files as committed, and a stale lock file fails the build
# instead of being rewritten in the tree.
CARGO ?= cargo
APT_PACKAGES := redis-server haproxy systemd curl chromium fonts-dejavu-core libssl-dev pkg-config openssl iproute2 \
	debhelper dpkg-dev build-essential lintian man-db systemd-container debootstrap
export CHAT_HA_BIN_DIR := $(CURDIR)/target/debug

.PHONY: all build deps deps-apt deps-node deps-npm run test test-rust test-e2e test-browser test-packaging test-fuzz test-system box rig rig-down deb bench bench-compare bench-attack lint

all: build

build:
	$(CARGO) build --locked --bins

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
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

test-rust: deps-apt
	$(CARGO) test --locked --workspace --all-targets
	# A short benchmark run: it fails on any lost, duplicated or refused message.
	$(CARGO) run --locked -q -p chat-bench -- --smoke

test-e2e: deps build
	cd tests/e2e && node --test --test-concurrency=1 --test-reporter=spec

# The project's own parsers under libFuzzer, briefly: request bodies, the
# configuration, the join payload, each against what the documentation says
# it accepts. cargo fuzz passes flags of the nightly compiler; this
# machine's toolchain is stable, hence RUSTC_BOOTSTRAP for this build only.
# cargo fuzz has no --locked: fetching with it first fails on a stale
# fuzz/Cargo.lock, which the build then has no reason to rewrite. Seeds
# are read from fuzz/corpus/ and never written there.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := post_body config join_payload
test-fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	$(CARGO) fetch --locked --manifest-path fuzz/Cargo.toml
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t target/fuzz-artifacts/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O -s none $$t target/fuzz-corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=target/fuzz-artifacts/$$t/ || exit 1; \
	done

# The chat page in headless Chromium, across two domains.
test-browser: deps build
	cd tests/browser && node --test --test-concurrency=1 --test-reporter=spec

# The benchmark: builds release binaries, starts its own topology on free
# ports, prints one JSON line (stdout) and a summary (stderr).
#   make bench BENCH_ARGS="--clients 1000 --rooms 10 --rate 1000 --duration 20"
BENCH_ARGS ?= --clients 1000 --rooms 10 --rate 1000 --duration 20
bench: deps-apt
	$(CARGO) build --locked --release --bins -p chat-ha -p chat-bench
	CHAT_HA_BIN_DIR=$(CURDIR)/target/release ./target/release/chat-bench $(BENCH_ARGS)

# The replay amplification attack of the security review (bench/attack.mjs):
# 20 attacking addresses against release binaries and HAProxy as packaged,
# beside a bystander; prints the figures and checks them against their
# targets.
bench-attack: deps-apt deps-npm
	$(CARGO) build --locked --release --bins -p chat-ha
	CHAT_HA_BIN_DIR=$(CURDIR)/target/release node bench/attack.mjs $(ATTACK_ARGS)

# chat-ha against the Node.js Socket.IO reference stack of bench/node
# (socket.io + Redis adapter, express + Redis emitter), back to back: the
# connection setup, then the default load, each on both stacks. Summaries on
# stderr; the JSON lines are collected in target/bench-compare.jsonl.
COMPARE_CONNECT_ARGS ?= --clients 10000 --rooms 100 --idle --idle-wait 0
COMPARE_LOAD_ARGS ?= --clients 1000 --rooms 10 --rate 1000 --duration 20
COMPARE_STACKS ?= chat-ha node
bench-compare: deps-apt deps-node
	cd bench/node && npm ci --no-audit --no-fund --loglevel=error
	$(CARGO) build --locked --release --bins -p chat-ha -p chat-bench
	@: > target/bench-compare.jsonl
	for args in "$(COMPARE_CONNECT_ARGS)" "$(COMPARE_LOAD_ARGS)"; do \
	  for stack in $(COMPARE_STACKS); do \
	    echo "== chat-bench --stack $$stack $$args" >&2; \
	    CHAT_HA_BIN_DIR=$(CURDIR)/target/release ./target/release/chat-bench \
	      --stack $$stack $$args >> target/bench-compare.jsonl || exit 1; \
	  done; \
	done

# Debian packages, written to target/debian/: chat-ha (single host),
# chat-ha-common, chat-frontend, chat-backend, chat-haproxy, chat-redis.
DEB_OUT := $(CURDIR)/target/debian
deb: deps-apt
	rm -rf $(DEB_OUT) && mkdir -p $(DEB_OUT)
	v=$$(dpkg-parsechangelog -SVersion); a=$$(dpkg-architecture -qDEB_HOST_ARCH); \
	DEB_OUT=$(DEB_OUT) dpkg-buildpackage -us -uc -b --post-clean \
	  --buildinfo-option=-u$(DEB_OUT) --changes-option=-u$(DEB_OUT) \
	  --buildinfo-file=$(DEB_OUT)/chat-ha_$${v}_$${a}.buildinfo \
	  --changes-file=$(DEB_OUT)/chat-ha_$${v}_$${a}.changes

# Units (verify, exposure score), packages (lintian, contents), and an install
# into a booted Debian 12 container: the product as an admin meets it.
test-packaging: deb
	tests/packaging/check-units.sh
	tests/packaging/check-debs.sh $(DEB_OUT)
	tests/packaging/install-test.sh $(DEB_OUT)

# The multi-host rig (vagrant-lxc): its box and dependency .debs are cached
# in /var/cache/chat-ha-rig; lb, front1, front2, back1, back2 and redis boot
# with the packages of target/debian installed for their role (chat-haproxy;
# chat-frontend or chat-backend with chat-ha-common; chat-redis), sharing a
# Redis password made once per rig.
box:
	tests/rig/box.sh
rig: box
	tests/rig/up.sh
rig-down:
	tests/rig/down.sh

# System tests through the rig's load balancer; the rig is taken down at the
# end unless KEEP_RIG=1.
test-system: deb deps-node
	tests/system/run.sh

test: lint test-rust test-fuzz test-e2e test-browser test-packaging test-system
