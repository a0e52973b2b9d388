//! `chat-frontend`: keeps Socket.IO connections and delivers each room's messages.
fn main() -> std::process::ExitCode {
    chat_ha::daemon::main(chat_ha::daemon::Role::Frontend)
}
