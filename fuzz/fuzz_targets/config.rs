//! The config parser and validator on arbitrary input: it must return a
//! config or an error, never panic, hang or blow up.
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz run config fuzz/corpus/config fuzz/seeds -- -max_total_time=300
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = gracesrv::Config::parse(std::path::Path::new("/fuzz/server.yaml"), text) {
            // Rendering the error must not panic either.
            let _ = e.to_string();
        }
    }
});
