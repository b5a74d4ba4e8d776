#!/usr/bin/env bash
# Fuzzes everything that parses untrusted bytes, each target for a bounded time:
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]      (default 60)
# Targets (fuzz/fuzz_targets/): codecs (JSON, postcard, text, bytes decoding), url
# (database URLs and password redaction), datalog (the example's parser), load (opening
# a table of arbitrary rows). New inputs land in fuzz/corpus/<target>/, which
# `tests/fuzz_corpus.rs` replays in every test run; crashes land in fuzz/artifacts/.
# cargo-fuzz needs nightly-only flags: RUSTC_BOOTSTRAP=1 lets this stable toolchain
# accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
status=0
for target in codecs url datalog load; do
  mkdir -p "corpus/$target"
  before=$(ls "corpus/$target" | wc -l)
  if cargo fuzz run -O "$target" "corpus/$target" -- -max_total_time="$seconds" -max_len=4096 \
      -print_final_stats=1 > "/tmp/fuzz-$target.log" 2>&1; then
    runs=$(grep -m1 -oE 'stat::number_of_executed_units: *[0-9]+' "/tmp/fuzz-$target.log" | grep -oE '[0-9]+$' || echo '?')
    echo "$target: ${seconds}s, $runs inputs run, corpus $before -> $(ls "corpus/$target" | wc -l), no crash"
  else
    echo "$target: CRASH, see /tmp/fuzz-$target.log and fuzz/artifacts/$target/" >&2
    status=1
  fi
done
# Keep the corpus small enough to commit and replay.
for target in codecs url datalog load; do
  cargo fuzz cmin -O "$target" "corpus/$target" > /dev/null 2>&1 || true
done
exit $status
