//! chat-ha: real-time chat rooms that scale across many hosts.
//!
//! A message travels one way through the system:
//!
//! ```text
//! POST /back/message ─▶ backend ─▶ validated message ─▶ Redis (room stream, shard channel) ─▶ frontends serving the room ─▶ sockets of the room
//! ```
//!
//! # Layout
//!
//! - [`config`]: the one typed TOML file both daemons read, with defaults and
//!   errors that name the file, line and key.
//! - [`message`]: what a valid room name, message and join request are; the
//!   only place that decides what input is acceptable.
//! - [`delivery`]: the Redis side. [`delivery::Store`] appends messages and
//!   reads history (backend); [`delivery::Feed`] follows the rooms a frontend
//!   serves, each from a cursor it can resume from after losing Redis.
//! - [`frontend`]: the Socket.IO server, the chat page and the frontend status.
//! - [`backend`]: the REST API: post a message, read history, status.
//! - [`auth`]: who may publish server-to-server: tokens from a credential file.
//! - [`metrics`]: the Prometheus counters each instance serves at `/metrics`.
//! - [`serve`]: HTTP serving both daemons share: who may connect, open
//!   connections counted, the metrics port, a graceful stop bounded in time.
//! - [`status`]: what the status endpoints answer the load balancer.
//! - [`systemd`]: socket activation, readiness, watchdog and stop notifications.
//! - [`logging`]: journal (syslog) under systemd, readable lines in a terminal.
//! - [`daemon`]: the command line and start-up sequence both binaries share.
//!
//! The `run` functions of [`frontend`] and [`backend`] take an already-bound
//! listener, so tests and socket activation hand them whatever socket they have.

pub mod auth;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod frontend;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod serve;
pub mod status;
pub mod systemd;
