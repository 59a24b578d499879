//! Tests that compare throughput (fedport bench against h2load): they run in a test
//! binary of their own, after `tests/it`, so that no other test shares the two cores
//! while they measure.

// shared with tests/it; only some of its helpers are used here
#[allow(dead_code)]
#[path = "../it/support/mod.rs"]
mod support;

mod bench;
