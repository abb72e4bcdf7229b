//! `config::parse_yaml`, `apply_env` (from `#env NAME=VALUE` lines) and
//! `FileConfig::validate`: no panic, every error names a path.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        llm_edge_fuzz::check_config(text);
    }
});
