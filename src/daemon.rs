//! The command line and start-up sequence shared by both binaries:
//! options → configuration → logging → runtime → listener → serve.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser};

use crate::config::{self, Config};
use crate::serve::Listeners;

/// Which daemon this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Frontend,
    Backend,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Frontend => "chat-frontend",
            Role::Backend => "chat-backend",
        }
    }

    /// Where instance 0 of this daemon listens.
    fn listen(self, config: &Config) -> SocketAddr {
        match self {
            Role::Frontend => config.frontend.listen,
            Role::Backend => config.backend.listen,
        }
    }

    /// Where instance 0 of this daemon serves its metrics.
    fn metrics_listen(self, config: &Config) -> SocketAddr {
        match self {
            Role::Frontend => config.frontend.metrics_listen,
            Role::Backend => config.backend.metrics_listen,
        }
    }
}

/// What `--print-network` prints: one `key value` pair per line, for the
/// generator of the socket units (`address` in the form `ListenStream=`
/// takes, IPv6 in brackets).
pub fn network_summary(role: Role, config: &Config) -> String {
    let listen = role.listen(config);
    let address = match listen {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
    };
    let allow: Vec<String> = config.access.allow.iter().map(|n| n.to_string()).collect();
    format!(
        "address {address}\nport {}\nallow {}\n",
        listen.port(),
        allow.join(" ")
    )
}

/// Options of both daemons.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "chat-ha daemon; see chat-frontend(8) and chat-backend(8)"
)]
pub struct Options {
    /// Configuration file.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Address to listen on when systemd passes no socket (overrides the configuration).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Address to serve /metrics on (overrides the configuration; port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Instance number, reported by the status endpoint (systemd passes %i).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub instance: u32,
    /// Check the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Print what the socket units need (listening address and port of
    /// instance 0, the networks allowed in) and exit; for chat-ha-generator.
    #[arg(long)]
    pub print_network: bool,
}

impl Options {
    /// Where this instance listens when systemd passes no socket.
    fn public_address(&self, role: Role, config: &Config) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| config::instance_address(role.listen(config), self.instance))
    }

    /// Where this instance serves its metrics.
    fn metrics_address(&self, role: Role, config: &Config) -> SocketAddr {
        self.metrics_listen
            .unwrap_or_else(|| config::instance_address(role.metrics_listen(config), self.instance))
    }
}

/// Runs the daemon `role` until SIGTERM or SIGINT; the binaries' `main`.
pub fn main(role: Role) -> ExitCode {
    let matches = Options::command().get_matches();
    let explicit = matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);
    let options = Options::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config = match Config::load(&options.config, explicit) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            eprintln!("{}: {e}", role.name());
            return ExitCode::from(2);
        }
    };
    if options.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    if options.print_network {
        print!("{}", network_summary(role, &config));
        return ExitCode::SUCCESS;
    }
    crate::logging::init(role.name(), config.log.level);
    for key in config.obsolete_keys() {
        tracing::warn!(
            "{key} is no longer used and has no effect: remove it from the configuration"
        );
    }
    let threads = match role {
        Role::Frontend => config.frontend.threads.get(),
        Role::Backend => config.backend.threads.get(),
    };
    let runtime = match build_runtime(threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(role, config, &options)) {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn build_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// How often the runtime's timer is made to wake, idle or not.
const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps the timer's next wake-up at most [`TIMER_TICK`] away.
///
/// Every request sets timers (header, body and Redis command timeouts), all
/// further away than that. Tokio wakes its own driver, with a system call,
/// whenever a timer is set earlier than the driver's next wake-up: an idle
/// instance, whose next wake-up is seconds away, paid two such calls per post.
/// Four wake-ups a second cost far less.
fn spawn_timer_tick() {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
        }
    });
}

async fn serve(
    role: Role,
    config: Arc<Config>,
    options: &Options,
) -> Result<(), Box<dyn std::error::Error>> {
    let listeners = Listeners {
        public: crate::systemd::listener(options.public_address(role, &config))?,
        metrics: crate::systemd::bind(options.metrics_address(role, &config))?,
    };
    if let Ok(metrics) = listeners.metrics.local_addr() {
        tracing::info!("serving /metrics on {metrics}");
    }
    tracing::info!(
        instance = options.instance,
        "{} {} starting",
        role.name(),
        env!("CARGO_PKG_VERSION")
    );
    crate::systemd::spawn_watchdog();
    spawn_timer_tick();
    #[cfg(debug_assertions)]
    crate::systemd::spawn_stall_hook();
    let shutdown = async {
        crate::systemd::shutdown_signal().await;
        crate::systemd::notify_stopping();
    };
    match role {
        Role::Frontend => {
            crate::frontend::run(config, listeners, options.instance, shutdown).await?
        }
        Role::Backend => crate::backend::run(config, listeners, options.instance, shutdown).await?,
    }
    Ok(())
}
