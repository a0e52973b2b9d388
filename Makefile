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
# bench/sio (chat-sio) is a crate of its own, on the published socketioxide
# rather than vendor/'s: its cargo commands name it, and build into target/
# beside the others.
SIO = --locked --manifest-path bench/sio/Cargo.toml --target-dir $(CURDIR)/target
# The Debian packages the project needs, besides Rust (rustup) and Node.js.
# Running (make run): the services it starts.
APT_RUN := redis-server haproxy
# Building the daemons (openssl-sys links libssl, mimalloc compiles C).
APT_BUILD := build-essential libssl-dev pkg-config
# Reading the locked crates (tests/msrv.sh, debian/gen-copyright).
APT_CRATES := jq
# Building the Debian packages: the tools of make deb (unshare is in the
# essential util-linux); the rest is debian/control's Build-Depends
# (deps-deb installs them).
APT_DEB := dpkg-dev iproute2
# Testing: the clients, Chromium, the packaging checks, the containers.
APT_TEST := systemd curl chromium fonts-dejavu-core openssl iproute2 lintian man-db systemd-container debootstrap
export CHAT_HA_BIN_DIR := $(CURDIR)/target/debug

.PHONY: all build deps deps-apt deps-run deps-lint deps-deb deps-node deps-npm run test test-rust test-e2e test-browser test-packaging test-fuzz test-system box rig rig-down deb deb-vendor bench bench-compare bench-attack lint

all: build

build:
	$(CARGO) build --locked --bins

# Installs the Debian packages of $(1) that are not installed yet (the
# package lists are updated only then).
apt_install = @missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# What make run needs: the services it starts and what building needs.
deps-run:
	$(call apt_install,$(APT_RUN) $(APT_BUILD))

# What make lint needs: clippy builds the crates.
deps-lint:
	$(call apt_install,$(APT_BUILD) $(APT_CRATES))

# What make deb needs: its tools, then the Build-Depends of debian/control
# (Debian 12's rustc-web and cargo-web among them).
deps-deb:
	$(call apt_install,$(APT_BUILD) $(APT_CRATES) $(APT_DEB))
	@dpkg-checkbuilddeps 2>/dev/null || { \
	  echo "installing the Build-Depends of debian/control"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq --no-install-recommends ./; }

# What running, building and testing need.
deps-apt:
	$(call apt_install,$(APT_RUN) $(APT_BUILD) $(APT_CRATES) $(APT_TEST))

# Node.js 20 or later runs the test clients and `make run`'s launcher.
deps-node:
	@node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' 2>/dev/null || \
	  { echo "Node.js 20 or later is needed (node and npm on PATH)" >&2; exit 1; }

# The JavaScript test clients, exactly as locked.
deps-npm: deps-node
	cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error

deps: deps-apt deps-npm

run: deps-run deps-node build
	node tests/e2e/run.mjs --port 8080 --log-dir $(CURDIR)/target/run-logs

lint: deps-lint
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) fmt --manifest-path bench/sio/Cargo.toml -- --check
	$(CARGO) clippy $(SIO) -- -D warnings
	tests/msrv.sh

test-rust: deps-apt
	$(CARGO) test --locked --workspace --all-targets
	# Short benchmark runs: each fails on any lost, duplicated or refused
	# message. socket.io 4 clients and one Redis; socket.io 2.x clients;
	# Sentinel mode, each post acknowledged by a replica; a Redis Cluster
	# of three primaries, then with a replica each acknowledging every
	# post; the plain socketioxide stack the figures compare against.
	$(CARGO) run --locked -q -p chat-bench -- --smoke
	$(CARGO) run --locked -q -p chat-bench -- --smoke --eio 3
	$(CARGO) run --locked -q -p chat-bench -- --smoke --redis-replicas 2
	$(CARGO) run --locked -q -p chat-bench -- --smoke --redis-cluster 3 --rooms 30
	$(CARGO) run --locked -q -p chat-bench -- --smoke --redis-cluster 3 --redis-replicas 1 --rooms 30
	$(CARGO) build $(SIO)
	$(CARGO) run --locked -q -p chat-bench -- --smoke --stack socketioxide

# The patched crates of vendor/ (vendor/README.md): the tree cargo builds
# must be the published crates with the patch series applied, nothing else;
# then their own test suites (upstream's and the patches'), in the workspace
# of vendor/Cargo.toml, with upstream's dev-dependencies as locked there.
test-vendor: deps-apt
	vendor/fork.sh check
	cd vendor && CARGO_TARGET_DIR=$(CURDIR)/target/vendor \
	  $(CARGO) test --locked --workspace --all-features --no-fail-fast

# The test files run one at a time. The idle drill (tests/e2e/idle-drill.mjs:
# socket.io 2 clients idle for 10 minutes through HAProxy) runs beside
# them, in a process and a cluster of its own, started first and awaited
# last: its minutes pass while the files run. Its report is printed at the
# end; the tier fails if either failed.
IDLE_DRILL_LOG := $(CURDIR)/target/idle-drill.log
test-e2e: deps build
	cd tests/e2e && { \
	  node idle-drill.mjs >'$(IDLE_DRILL_LOG)' 2>&1 & drill=$$!; \
	  trap 'kill "$$drill" 2>/dev/null' INT TERM; \
	  node --test --test-concurrency=1 --test-reporter=spec; tests=$$?; \
	  echo "waiting for the idle drill (pid $$drill, log $(IDLE_DRILL_LOG))"; \
	  wait $$drill; drilled=$$?; \
	  cat '$(IDLE_DRILL_LOG)'; \
	  echo "e2e tests: exit $$tests; idle drill: exit $$drilled"; \
	  [ $$tests -eq 0 ] && [ $$drilled -eq 0 ]; \
	}

# The project's own parsers under libFuzzer, briefly: request bodies, the
# configuration, the join payload, each against what the documentation says
# it accepts; and Engine.IO 3's framing (socket.io 2.x clients) through the
# parsers the frontend runs. cargo fuzz passes flags of the nightly
# compiler; this machine's toolchain is stable, hence RUSTC_BOOTSTRAP for
# this build only.
# cargo fuzz has no --locked: fetching with it first fails on a stale
# fuzz/Cargo.lock, which the build then has no reason to rewrite. Seeds
# are read from fuzz/corpus/ and never written there.
FUZZ_SECONDS ?= 20
FUZZ_TARGETS := post_body config join_payload eio3_frames
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
	$(CARGO) build --release $(SIO)
	CHAT_HA_BIN_DIR=$(CURDIR)/target/release ./target/release/chat-bench $(BENCH_ARGS)

# The replay amplification attack of the security review (bench/attack.mjs):
# 20 attacking addresses against release binaries and HAProxy as packaged,
# beside a bystander; prints the figures and checks them against their
# targets.
bench-attack: deps-apt deps-npm
	$(CARGO) build --locked --release --bins -p chat-ha
	CHAT_HA_BIN_DIR=$(CURDIR)/target/release node bench/attack.mjs $(ATTACK_ARGS)

# chat-ha against its peers, back to back: the Node.js Socket.IO reference
# stack of bench/node (socket.io + Redis adapter, express + Redis emitter),
# plain socketioxide (chat-sio: socketioxide-redis, axum) and the floor
# (chat-floor). Each load runs on every stack before the next load: the
# connection setup and idle memory, the default load, 10,000 clients, the
# default load beside a CPU hog; then the backends alone at 1,000 and 8,000
# posts/s (the floor has no backend; Node.js's saturates one core near
# 3,000 posts/s, so it runs the first rate only). Summaries on stderr; the
# JSON lines are collected in target/bench-compare.jsonl.
COMPARE_CONNECT_ARGS ?= --clients 10000 --rooms 100 --idle --idle-wait 0
COMPARE_LOAD_ARGS ?= --clients 1000 --rooms 10 --rate 1000 --duration 20
COMPARE_CROWD_ARGS ?= --clients 10000 --rooms 100 --rate 100 --duration 15
COMPARE_HOG_ARGS ?= $(COMPARE_LOAD_ARGS) --cpu-hogs 1
COMPARE_POST_ARGS ?= --clients 10 --rooms 10 --duration 10
COMPARE_STACKS ?= chat-ha socketioxide node floor
compare_run = echo "== chat-bench --stack $(1) $(2)" >&2; \
	CHAT_HA_BIN_DIR=$(CURDIR)/target/release ./target/release/chat-bench \
	  --stack $(1) $(2) >> target/bench-compare.jsonl || exit 1
bench-compare: deps-apt deps-node
	cd bench/node && npm ci --no-audit --no-fund --loglevel=error
	$(CARGO) build --locked --release --bins -p chat-ha -p chat-bench
	$(CARGO) build --release $(SIO)
	@: > target/bench-compare.jsonl
	for args in "$(COMPARE_CONNECT_ARGS)" "$(COMPARE_LOAD_ARGS)" "$(COMPARE_CROWD_ARGS)" "$(COMPARE_HOG_ARGS)"; do \
	  for stack in $(COMPARE_STACKS); do \
	    $(call compare_run,$$stack,$$args); \
	  done; \
	done
	for stack in $(filter-out floor,$(COMPARE_STACKS)); do \
	  $(call compare_run,$$stack,$(COMPARE_POST_ARGS) --rate 1000); \
	done
	for stack in $(filter-out floor node,$(COMPARE_STACKS)); do \
	  $(call compare_run,$$stack,$(COMPARE_POST_ARGS) --rate 8000); \
	done

# Debian packages, written to target/debian/: chat-ha (single host),
# chat-ha-common, chat-frontend, chat-backend, chat-haproxy, chat-redis.
# Two steps: deb-vendor fetches what the build needs, then the package build
# runs without any network (Debian policy): in a network namespace of its
# own, where no interface is up and no route exists, checked before it
# starts. A build that tried to download would fail there.
DEB_OUT := $(CURDIR)/target/debian
WITHOUT_NETWORK = unshare --net $(if $(filter 0,$(shell id -u)),,--map-root-user) -- \
	sh -euc '[ -z "$$(ip -o route show; ip -o -6 route show)" ] || { echo "make deb: the build namespace has a route" >&2; exit 1; }; exec "$$@"' without-network
deb: deps-deb deb-vendor
	rm -rf $(DEB_OUT) && mkdir -p $(DEB_OUT)
	v=$$(dpkg-parsechangelog -SVersion); a=$$(dpkg-architecture -qDEB_HOST_ARCH); \
	$(WITHOUT_NETWORK) env DEB_OUT=$(DEB_OUT) dpkg-buildpackage -us -uc -b --post-clean \
	  --buildinfo-option=-u$(DEB_OUT) --changes-option=-u$(DEB_OUT) \
	  --buildinfo-file=$(DEB_OUT)/chat-ha_$${v}_$${a}.buildinfo \
	  --changes-file=$(DEB_OUT)/chat-ha_$${v}_$${a}.changes

# The crates of Cargo.lock, as published, into debian/cargo-vendor (the
# package build reads them from there), and the check that debian/copyright
# covers exactly those crates. Made anew each time: cargo vendor keeps a
# crate's directory that exists, even if a file of it is gone.
deb-vendor: deps-deb
	rm -rf debian/cargo-vendor
	$(CARGO) vendor --locked --versioned-dirs --quiet debian/cargo-vendor >/dev/null
	debian/gen-copyright --check

# Units (verify, exposure score), packages (lintian, contents), and an install
# into a booted Debian 12 container: the product as an admin meets it.
test-packaging: deps-apt deb
	tests/packaging/check-units.sh
	tests/packaging/check-debs.sh $(DEB_OUT)
	tests/packaging/install-test.sh $(DEB_OUT)

# The multi-host rig (vagrant-lxc): its box and dependency .debs are cached
# in /var/cache/chat-ha-rig; lb1, lb2, front1, front2, back1, back2 and
# redis1-3 boot with the packages of target/debian installed for their role
# (chat-haproxy and keepalived; chat-frontend or chat-backend with
# chat-ha-common; chat-redis and redis-sentinel), sharing the Redis
# passwords made once per rig. CHAT_HA_RIG_REDIS=cluster: redis1-6, a Redis
# Cluster (chat-redis with cluster mode on), in place of redis1-3.
box:
	tests/rig/box.sh
rig: box
	tests/rig/up.sh
rig-down:
	tests/rig/down.sh

# System tests through the rig's load balancer, on both Redis layouts in turn:
# Sentinel (tests/system/*.test.mjs), then Cluster (tests/system/cluster/);
# the rig is taken down between them, and at the end unless KEEP_RIG=1.
test-system: deps-apt deb deps-node
	tests/system/run.sh

test: lint test-vendor test-rust test-fuzz test-e2e test-browser test-packaging test-system
