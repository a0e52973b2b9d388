//! Configuration files: any text is either a configuration or an error that
//! names the file; nothing panics.
#![no_main]

use std::path::Path;

use chat_ha::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = Config::from_toml(text, Path::new("/fuzz/chat-ha.toml"))
    {
        assert!(e.to_string().starts_with("/fuzz/chat-ha.toml: "));
    }
});
