//! Lua scripts, sent by their digest.
//!
//! Every script runs as `EVALSHA` (the digest, never the whole text, goes
//! over the wire per call). A server that does not have the script yet (a
//! new or restarted one, or a replica promoted since the script was loaded)
//! answers `NOSCRIPT`: [`run`] then loads it and sends the request once
//! more, be it one command or a pipeline of several.

use redis::aio::ConnectionLike;
use redis::{FromRedisValue, RedisFuture, RedisResult, Script};

/// An `EVALSHA` of `script` with `keys` keys, to which the keys and then the
/// arguments are added. Built as one command, where redis-rs's
/// `ScriptInvocation` would first copy each key and argument once more: the
/// append runs once per post.
pub fn evalsha(script: &Script, keys: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys);
    cmd
}

/// What is sent as one request: a command, or a pipeline of commands.
/// (Boxed: a future of a generic trait method is not yet known to be
/// `Send` where a task needs it.)
pub trait Request: Sync {
    fn send<'a, T: FromRedisValue + 'a, C: ConnectionLike + Send>(
        &'a self,
        conn: &'a mut C,
    ) -> RedisFuture<'a, T>;
}

impl Request for redis::Cmd {
    fn send<'a, T: FromRedisValue + 'a, C: ConnectionLike + Send>(
        &'a self,
        conn: &'a mut C,
    ) -> RedisFuture<'a, T> {
        Box::pin(self.query_async(conn))
    }
}

impl Request for redis::Pipeline {
    fn send<'a, T: FromRedisValue + 'a, C: ConnectionLike + Send>(
        &'a self,
        conn: &'a mut C,
    ) -> RedisFuture<'a, T> {
        Box::pin(self.query_async(conn))
    }
}

/// Sends `request`, whose `EVALSHA`s call `script`; when Redis does not
/// have the script, loads it and sends `request` once more. (A pipeline's
/// error takes the kind of its first failed command.)
pub async fn run<T: FromRedisValue + 'static, C: ConnectionLike + Send>(
    script: &Script,
    request: &impl Request,
    conn: &mut C,
) -> RedisResult<T> {
    match request.send(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load_async(conn).await?;
            request.send(conn).await
        }
        result => result,
    }
}
