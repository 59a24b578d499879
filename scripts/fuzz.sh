#!/usr/bin/env bash
# Bounded fuzzing on the stable toolchain: the property tests of tests/it/properties.rs
# (PROXY header parser, config loader, protobuf wire validator, HTTP/2 frame guard,
# gRPC framer) with many more cases, for at most SECONDS each run.
#   scripts/fuzz.sh [CASES] [SECONDS]
# A failure prints the minimal input; add it to tests/it/properties.rs as a regression case.
set -euo pipefail
cd "$(dirname "$0")/.."
PROPTEST_CASES=${1:-200000} timeout "${2:-600}" cargo test --release --test it properties::
