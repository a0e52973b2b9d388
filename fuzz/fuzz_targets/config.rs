//! Configuration files: any text is either a configuration or an error that
//! names the file; nothing panics. And an accepted configuration keeps to
//! what the README and the shipped file document, checked here without the
//! library's own validation:
//!
//! - `frontend.max_queued_bytes` is at least 64 KiB;
//! - `frontend.ping_interval_ms` is from 1000 to 50000, and
//!   `frontend.ping_timeout_ms` from 1000 to 60000;
//! - no Redis URL (`redis.url`, or each of `redis.sentinels`) holds a
//!   password, neither as a URL's password (`redis://user:password@host`)
//!   nor as the `pass` of a socket URL (`unix:///path?pass=...`): the file
//!   is readable by everyone on the host.
#![no_main]

use std::path::Path;

use chat_ha::config::{Config, RedisMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, Path::new("/fuzz/chat-ha.toml")) {
        Err(e) => assert!(e.to_string().starts_with("/fuzz/chat-ha.toml: "), "{e}"),
        Ok(config) => {
            let queued = config.frontend.max_queued_bytes.get();
            assert!(queued >= 64 * 1024, "max_queued_bytes {queued} accepted");
            let interval = config.frontend.ping_interval_ms;
            assert!(
                (1000..=50_000).contains(&interval),
                "ping_interval_ms {interval} accepted"
            );
            let timeout = config.frontend.ping_timeout_ms;
            assert!(
                (1000..=60_000).contains(&timeout),
                "ping_timeout_ms {timeout} accepted"
            );
            let urls: Vec<&str> = match &config.redis.mode {
                RedisMode::Single(url) => vec![url.as_str()],
                RedisMode::Sentinel(sentinel) => {
                    sentinel.sentinels.iter().map(|url| url.as_str()).collect()
                }
                RedisMode::Cluster(cluster) => {
                    cluster.seeds.iter().map(|url| url.as_str()).collect()
                }
            };
            for url in urls {
                assert!(
                    !holds_password(url),
                    "a Redis URL with a password accepted: {url}"
                );
            }
        }
    }
});

/// Whether the Redis URL `url` carries a password: the URL's own for a
/// network address, the `pass` query parameter for a unix socket.
fn holds_password(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    if parsed.scheme().ends_with("unix") {
        parsed.query_pairs().any(|(key, _)| key == "pass")
    } else {
        parsed.password().is_some()
    }
}
