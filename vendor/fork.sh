#!/bin/bash
# The vendored crates as upstream published them plus chat-ha's patch series
# (vendor/README.md explains the layout and the workflow).
#
#   fork.sh check                 each vendor/NAME is exactly
#                                 vendor/upstream/NAME-VERSION with
#                                 vendor/patches/NAME/*.patch applied in order
#   fork.sh apply [NAME...]       rebuild vendor/NAME from those two
#   fork.sh edit NAME DIR         a git repository in DIR: the published crate
#                                 (tag `upstream`), then one commit per patch
#                                 (branch `fork`), to change with plain git
#   fork.sh export NAME DIR       DIR's commits after `upstream` become the
#                                 patch series again; vendor/NAME is rebuilt
#   fork.sh upgrade NAME VERSION DIR
#                                 DIR as `edit` makes it, then the published
#                                 VERSION as the new `upstream` and the patches
#                                 cherry-picked onto it; resolve what git
#                                 cannot, then `export`
#   fork.sh verify                each vendor/upstream/NAME-VERSION is the
#                                 .crate that crates.io publishes (fetched
#                                 with cargo, its checksum checked against the
#                                 registry's index)
set -eu

VENDOR=$(cd "$(dirname "$0")" && pwd)
UPSTREAM=$VENDOR/upstream
PATCHES=$VENDOR/patches
CARGO=${CARGO:-cargo}

# git, unaffected by the user's configuration where it would change what is
# committed or how patches look, and committing under a fixed name.
g() {
	git -c core.excludesFile=/dev/null -c core.autocrlf=false -c core.hooksPath=/dev/null \
		-c commit.gpgSign=false -c tag.gpgSign=false -c format.signOff=false \
		-c diff.noprefix=false -c diff.mnemonicPrefix=false -c diff.renames=true \
		-c user.name="${GIT_AUTHOR_NAME:-chat-ha}" -c user.email="${GIT_AUTHOR_EMAIL:-chat-ha@invalid}" \
		"$@"
}

die() {
	echo "fork.sh: $*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
}

# The directory of NAME's published sources: exactly one per crate.
upstream_dir() {
	local name=$1 dirs
	dirs=$(find "$UPSTREAM" -mindepth 1 -maxdepth 1 -type d -name "$name-[0-9]*" | sort)
	[ -n "$dirs" ] || die "no vendor/upstream/$name-VERSION"
	[ "$(printf '%s\n' "$dirs" | wc -l)" -eq 1 ] || die "more than one vendor/upstream/$name-*: $dirs"
	printf '%s\n' "$dirs"
}

# Every vendored crate's name, from vendor/upstream.
crate_names() {
	local dir
	for dir in "$UPSTREAM"/*/; do
		basename "$dir" | sed -E 's/-[0-9]+\.[0-9]+\.[0-9]+.*$//'
	done | sort -u
}

# A field (name, version) of the [package] table of a normalised Cargo.toml.
package_field() {
	awk -v key="$2" '
		/^\[/ { in_package = ($0 == "[package]") }
		in_package && $1 == key && $2 == "=" { gsub(/"/, "", $3); print $3; exit }
	' "$1"
}

# Copies the files of directory $1 into $2 (made empty first), all of them.
copy_tree() {
	rm -rf "$2"
	mkdir -p "$2"
	cp -a "$1/." "$2/"
}

# Commits the whole work tree of repository $1 with message $2.
commit_all() {
	g -C "$1" add -A -f .
	g -C "$1" commit -q --allow-empty -m "$2"
}

# Makes $2 a git repository: NAME's published sources committed and tagged
# `upstream`, then each patch applied as a commit on branch `fork`.
build_repo() {
	local name=$1 repo=$2 source patch
	source=$(upstream_dir "$name")
	[ ! -e "$repo" ] || [ -z "$(ls -A "$repo")" ] || die "$repo exists and is not empty"
	mkdir -p "$repo"
	g -C "$repo" init -q -b fork
	cp -a "$source/." "$repo/"
	commit_all "$repo" "$(basename "$source") as published"
	g -C "$repo" tag upstream
	for patch in "$PATCHES/$name"/*.patch; do
		[ -e "$patch" ] || continue
		g -C "$repo" am -q --no-3way --whitespace=nowarn "$patch" ||
			die "$(basename "$patch") does not apply to $(basename "$source")"
	done
}

# The tree cargo should build for NAME, written to $2 (no .git).
build_tree() {
	build_repo "$1" "$2"
	rm -rf "$2/.git"
}

# Scratch space for one run, removed when it ends.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/chat-ha-fork.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

cmd_check() {
	local tmp=$WORK/check name failed=0 manifest
	# Every crate cargo may build from vendor/ is a published one plus patches.
	for manifest in "$VENDOR"/*/Cargo.toml; do
		upstream_dir "$(basename "$(dirname "$manifest")")" >/dev/null
	done
	for name in $(crate_names); do
		build_tree "$name" "$tmp/$name"
		if diff -r "$tmp/$name" "$VENDOR/$name" >/dev/null 2>&1; then
			echo "vendor/$name = $(basename "$(upstream_dir "$name")") + $(find "$PATCHES/$name" -name '*.patch' 2>/dev/null | wc -l) patches"
		else
			diff -ru "$tmp/$name" "$VENDOR/$name" | sed "s|$tmp/|(upstream + patches)/|" | head -200 >&2 || true
			echo "fork.sh: vendor/$name is not $(basename "$(upstream_dir "$name")") + vendor/patches/$name" \
				"(above, what differs). Make a change a patch with 'vendor/fork.sh edit $name DIR' and" \
				"'export $name DIR'; 'vendor/fork.sh apply $name' rebuilds vendor/$name from the patches." >&2
			failed=1
		fi
	done
	return "$failed"
}

cmd_apply() {
	local tmp=$WORK/apply name
	if [ $# -eq 0 ]; then
		local names
		mapfile -t names < <(crate_names)
		set -- "${names[@]}"
	fi
	for name in "$@"; do
		build_tree "$name" "$tmp/$name"
		copy_tree "$tmp/$name" "$VENDOR/$name"
		echo "vendor/$name rebuilt from $(basename "$(upstream_dir "$name")") and vendor/patches/$name"
	done
}

cmd_edit() {
	[ $# -eq 2 ] || usage
	build_repo "$1" "$2"
	cat <<-EOF
		$2: branch fork, one commit per patch on top of tag upstream.
		Change it with plain git (a new commit per change; fix an existing
		patch with 'git commit --fixup' and 'git rebase -i --autosquash upstream'),
		then: vendor/fork.sh export $1 $2
	EOF
}

cmd_export() {
	[ $# -eq 2 ] || usage
	local name=$1 repo=$2 tmp=$WORK/export version source
	g -C "$repo" rev-parse -q --verify refs/tags/upstream >/dev/null || die "$repo has no tag upstream"
	[ -z "$(g -C "$repo" status --porcelain)" ] || die "$repo has uncommitted changes"
	mkdir -p "$tmp/upstream"
	g -C "$repo" archive upstream | tar -x -C "$tmp/upstream"
	[ "$(package_field "$tmp/upstream/Cargo.toml" name)" = "$name" ] || die "$repo's upstream is not $name"
	version=$(package_field "$tmp/upstream/Cargo.toml" version)
	source=$(upstream_dir "$name")
	if [ "$(basename "$source")" = "$name-$version" ]; then
		diff -r "$tmp/upstream" "$source" >/dev/null ||
			die "$repo's upstream commit differs from vendor/upstream/$name-$version"
	else
		# An upgrade: the new published sources replace the old.
		rm -rf "$source"
		copy_tree "$tmp/upstream" "$UPSTREAM/$name-$version"
		echo "vendor/upstream/$(basename "$source") replaced by $name-$version"
	fi
	rm -rf "${PATCHES:?}/${name:?}"
	mkdir -p "$PATCHES/$name"
	g -C "$repo" format-patch -q --zero-commit --no-signature --no-numbered --full-index \
		-o "$PATCHES/$name" upstream..HEAD
	echo "vendor/patches/$name: $(find "$PATCHES/$name" -name '*.patch' | wc -l) patches"
	cmd_apply "$name"
}

# Downloads NAME VERSION through cargo (which takes it from the registry its
# index names), checks the .crate against the checksum of the index, and
# unpacks it into $3.
fetch_crate() {
	local name=$1 version=$2 out=$3 project=$WORK/fetch-$1 crate sum want
	mkdir -p "$project/src"
	: >"$project/src/lib.rs"
	cat >"$project/Cargo.toml" <<-EOF
		[package]
		name = "fetch-published-crate"
		version = "0.0.0"
		edition = "2021"
		publish = false

		[dependencies]
		$name = "=$version"

		[workspace]
	EOF
	# Offline first: what the cache holds needs no network.
	(cd "$project" && { "$CARGO" fetch -q --offline 2>/dev/null || "$CARGO" fetch -q; }) ||
		die "cargo could not fetch $name $version"
	want=$(awk -v name="$name" -v version="$version" '
		$1 == "name" { n = $3 } $1 == "version" { v = $3 }
		$1 == "checksum" && n == "\"" name "\"" && v == "\"" version "\"" { gsub(/"/, "", $3); print $3 }
	' "$project/Cargo.lock")
	[ -n "$want" ] || die "no checksum for $name $version in the registry's index"
	crate=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "$name-$version.crate" | head -n 1)
	[ -n "$crate" ] || die "cargo fetched $name $version, but its .crate is not in the cache"
	sum=$(sha256sum "$crate" | cut -d' ' -f1)
	[ "$sum" = "$want" ] || die "$crate: sha256 $sum, the index says $want"
	rm -rf "$project"
	mkdir -p "$out"
	tar -xzf "$crate" -C "$out" --strip-components=1
}

cmd_verify() {
	local tmp=$WORK/verify name source version
	for name in $(crate_names); do
		source=$(upstream_dir "$name")
		version=$(package_field "$source/Cargo.toml" version)
		[ "$(basename "$source")" = "$name-$version" ] || die "$source holds version $version"
		fetch_crate "$name" "$version" "$tmp/$name"
		if ! diff -r "$tmp/$name" "$source" >&2; then
			die "vendor/upstream/$name-$version is not what crates.io publishes (above, what differs)"
		fi
		echo "vendor/upstream/$name-$version = the published .crate"
	done
}

cmd_upgrade() {
	[ $# -eq 3 ] || usage
	local name=$1 version=$2 repo=$3 new=$WORK/upgrade
	build_repo "$name" "$repo"
	g -C "$repo" tag old-upstream upstream
	g -C "$repo" tag -d upstream >/dev/null
	g -C "$repo" branch -q -m fork old-fork
	g -C "$repo" checkout -q -b fork old-upstream
	fetch_crate "$name" "$version" "$new/crate"
	g -C "$repo" rm -rq .
	cp -a "$new/crate/." "$repo/"
	commit_all "$repo" "$name-$version as published"
	g -C "$repo" tag upstream
	if g -C "$repo" cherry-pick old-upstream..old-fork; then
		echo "$repo: every patch applies to $name $version; review, build, then: vendor/fork.sh export $name $repo"
	else
		cat >&2 <<-EOF
			$repo: a patch does not apply to $name $version as it stands.
			Resolve the conflict there, 'git cherry-pick --continue' (until none
			is left), then: vendor/fork.sh export $name $repo
		EOF
		exit 1
	fi
}

[ $# -gt 0 ] || usage
command=$1
shift
case $command in
check) cmd_check "$@" ;;
apply) cmd_apply "$@" ;;
edit) cmd_edit "$@" ;;
export) cmd_export "$@" ;;
upgrade) cmd_upgrade "$@" ;;
verify) cmd_verify "$@" ;;
*) usage ;;
esac
