//! `body::inspect` + `body::rewrite` on arbitrary bytes, checked against an
//! independent parse of the top-level members (see `check_body`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    llm_edge_fuzz::check_body_variants(data);
});
