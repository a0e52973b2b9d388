//! `chat-backend`: accepts posted messages and serves history; holds no sockets.
fn main() -> std::process::ExitCode {
    chat_ha::daemon::main(chat_ha::daemon::Role::Backend)
}
