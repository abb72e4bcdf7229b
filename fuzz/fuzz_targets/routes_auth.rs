//! `routes::classify` and `KeyTable::authenticate` on arbitrary input.
//! The first line is the method, the rest the path; the whole input is also
//! used as an `Authorization` header value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (method, path) = text.split_once('\n').unwrap_or(("GET", &text));
    llm_edge_fuzz::check_route(method, path);
    llm_edge_fuzz::check_auth(data);
});
