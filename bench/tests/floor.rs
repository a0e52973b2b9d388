//! `chat-floor` speaks what the benchmark's clients and poster speak: two
//! sockets of a room get exactly the posted frame, a socket of another room
//! gets nothing, the post is answered 201, and SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{WebSocketStream, client_async};

type Ws = WebSocketStream<TcpStream>;

const WAIT: Duration = Duration::from_secs(5);

/// The running server; killed if the test fails before stopping it.
struct Floor {
    child: Child,
    addr: SocketAddr,
}

impl Floor {
    fn start() -> Floor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chat-floor"))
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start chat-floor");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the address");
        let addr = line.trim().parse().expect("an address on the first line");
        Floor { child, addr }
    }

    /// Sends SIGTERM and expects a successful exit.
    fn stop(mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "exit status {status}");
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        match frame.expect("open").expect("a frame") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned())).await.expect("send");
}

/// Connects, completes the Engine.IO and Socket.IO handshakes, joins `room`.
async fn join(addr: SocketAddr, room: &str) -> Ws {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let url = format!("ws://{addr}/front/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = client_async(url, stream).await.expect("upgrade");
    let open = next_text(&mut ws).await;
    assert!(open.starts_with("0{\"sid\":\""), "{open}");
    assert!(open.contains("\"pingInterval\":25000"), "{open}");
    send(&mut ws, "40").await;
    assert!(next_text(&mut ws).await.starts_with("40{\"sid\":\""));
    send(&mut ws, "2").await;
    assert_eq!(next_text(&mut ws).await, "3");
    send(&mut ws, &format!("427[\"room\",\"{room}\"]")).await;
    assert_eq!(next_text(&mut ws).await, "437[{\"ok\":true}]");
    ws
}

/// One HTTP/1.1 request on `stream` (kept alive): (status, body).
async fn request(stream: &mut TcpStream, method: &str, path: &str, body: &str) -> (u16, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: floor\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("content-length")
                .parse()
                .expect("a length");
            if rest.len() >= length {
                let status = head[9..12].parse().expect("a status");
                return (status, rest[..length].to_owned());
            }
        }
    }
}

#[tokio::test]
async fn broadcasts_to_the_room_only() {
    let floor = Floor::start();
    let mut a = join(floor.addr, "r1").await;
    let mut b = join(floor.addr, "r1").await;
    let mut c = join(floor.addr, "r2").await;
    let mut http = TcpStream::connect(floor.addr).await.expect("connect");

    for path in ["/front/status", "/back/status"] {
        let (status, body) = request(&mut http, "GET", path, "").await;
        assert_eq!(status, 200, "{path}");
        assert!(body.contains("\"sockets\":3"), "{body}");
    }

    let post = r#"{"room":"r1","message":"hello \"quoted\" é"}"#;
    let (status, body) = request(&mut http, "POST", "/back/message", post).await;
    assert_eq!(status, 201);
    assert_eq!(
        body,
        r#"{"id":"1-0","room":"r1","message":"hello \"quoted\" é"}"#
    );
    let expected = format!("42[\"message\",{body}]");
    assert_eq!(next_text(&mut a).await, expected);
    assert_eq!(next_text(&mut b).await, expected);

    // The next thing c receives is its own room's message, not r1's.
    let (status, body) = request(
        &mut http,
        "POST",
        "/back/message",
        r#"{"room":"r2","message":"x"}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (201, r#"{"id":"2-0","room":"r2","message":"x"}"#)
    );
    assert_eq!(next_text(&mut c).await, format!("42[\"message\",{body}]"));

    // A client that closes leaves its room; the others still get messages.
    a.close(None).await.expect("close");
    while let Some(Ok(_)) = a.next().await {}
    let (status, body) = request(
        &mut http,
        "POST",
        "/back/message",
        r#"{"room":"r1","message":"y"}"#,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(next_text(&mut b).await, format!("42[\"message\",{body}]"));

    let (status, _) = request(&mut http, "POST", "/back/message", r#"{"room":1}"#).await;
    assert_eq!(status, 400);
    let (status, _) = request(&mut http, "GET", "/nowhere", "").await;
    assert_eq!(status, 404);
    floor.stop();
}

/// A socket that stops reading is written to until the kernel's buffers are
/// full, then queued for, then closed once too much waits for it; the
/// server carries on.
#[tokio::test]
async fn closes_a_socket_that_does_not_read() {
    let floor = Floor::start();
    let stalled = join(floor.addr, "slow").await;
    let mut http = TcpStream::connect(floor.addr).await.expect("connect");
    let post = format!(r#"{{"room":"slow","message":"{}"}}"#, "x".repeat(16 * 1024));
    let mut posts = 0;
    loop {
        let (status, _) = request(&mut http, "POST", "/back/message", &post).await;
        assert_eq!(status, 201);
        posts += 1;
        let (_, body) = request(&mut http, "GET", "/back/status", "").await;
        if body.contains("\"sockets\":0") {
            break;
        }
        assert!(posts < 5_000, "still open after {posts} posts: {body}");
    }
    // More than the queue's limit was posted, some of it taken by the kernel.
    assert!(posts > 1_000, "closed after {posts} posts");
    let (status, _) = request(&mut http, "GET", "/front/status", "").await;
    assert_eq!(status, 200);
    drop(stalled);
    floor.stop();
}
