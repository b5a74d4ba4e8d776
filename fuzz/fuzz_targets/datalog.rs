#![no_main]

#[path = "../common.rs"]
#[allow(dead_code)]
mod common;

#[path = "../../examples/datalog/syntax.rs"]
#[allow(dead_code)]
mod syntax;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::datalog(data));
