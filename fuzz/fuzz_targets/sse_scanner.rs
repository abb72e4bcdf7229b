//! `sse::SseScanner` (and `JsonCollector`) on arbitrary bytes: no panic,
//! consistent counts, and the same stats however the input is chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    llm_edge_fuzz::check_sse_variants(data);
});
