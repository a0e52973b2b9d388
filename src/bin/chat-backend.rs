//! `chat-backend`: accepts posted messages and serves history; holds no sockets.
fn main() -> std::process::ExitCode {
    chat_ha::daemon::main(chat_ha::daemon::Role::Backend)
}

/// glibc's allocator took a fifth of this daemon's instructions per post
/// (hyper allocates a read buffer for every request, and glibc consolidates
/// its free lists for each); with mimalloc a post costs a tenth fewer.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
