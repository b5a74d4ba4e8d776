#!/usr/bin/env bash
# What a newcomer meets: packs the crates as `cargo publish` would, then builds the
# README's first Rust example in a new project that depends on the packed library with
# its default features only, as `cargo add write-thru-hash` would give it.
#   bash scripts/package_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
# --allow-dirty: a session's tree may hold uncommitted work; CI's clone is clean.
cargo package --workspace --exclude wth-bench --no-verify --allow-dirty --quiet 2>&1 \
  | grep -v "^warning: ignoring test" || true
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$target/package/write-thru-hash-$version.crate" -C "$work"
for f in LICENSE-MIT LICENSE-APACHE CHANGELOG.md README.md src/lib.rs; do
  [ -f "$work/write-thru-hash-$version/$f" ] || { echo "the package lacks $f" >&2; exit 1; }
done
mkdir -p "$work/user/src"
cat > "$work/user/Cargo.toml" <<TOML
[package]
name = "readme-user"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
write-thru-hash = { path = "../write-thru-hash-$version" }

[workspace]
TOML
# The first ```rust block of the README, as it stands.
awk '/^```rust/{if (!done) {f=1}; next} /^```/{if (f) {done=1}; f=0} f' README.md > "$work/user/src/main.rs"
grep -q "fn main" "$work/user/src/main.rs" || { echo "the README's first example has no main" >&2; exit 1; }
(cd "$work/user" && CARGO_TARGET_DIR="$target/readme-user" cargo build --quiet && \
  CARGO_TARGET_DIR="$target/readme-user" cargo run --quiet)
echo "README's first example builds and runs against the packaged crate (default features)"
