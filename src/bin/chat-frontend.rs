//! `chat-frontend`: keeps Socket.IO connections and delivers each room's messages.
fn main() -> std::process::ExitCode {
    chat_ha::daemon::main(chat_ha::daemon::Role::Frontend)
}

/// The allocator chat-backend uses (see there); here it saves little (3% of
/// the instructions per delivery) but keeps the two daemons alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
