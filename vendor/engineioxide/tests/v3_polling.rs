//! Engine.IO 3 long-polling through the patched transport (chat-ha patch;
//! see vendor/README.md). Protocol 3 frames a payload as `<length>:<packet>`
//! with the length in UTF-16 code units, as JavaScript counts a string, and
//! sends binary data in base64 (`b4...`) to a client that asks for text
//! (`b64=1`). A packet that does not fit in a response waits for the next
//! poll, and is counted as waiting for the client until then.
#![cfg(feature = "v3")]

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bytes::Bytes;
use engineioxide::{
    Str,
    config::EngineIoConfig,
    handler::EngineIoHandler,
    service::EngineIoService,
    socket::{DisconnectReason, Socket},
};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;
use tower_service::Service;

/// A handler that hands every connected socket to the test.
#[derive(Debug, Clone)]
struct SocketHandler {
    socket_tx: mpsc::Sender<Arc<Socket<()>>>,
}

impl EngineIoHandler for SocketHandler {
    type Data = ();

    fn on_connect(self: Arc<Self>, socket: Arc<Socket<()>>) {
        self.socket_tx.try_send(socket).unwrap();
    }
    fn on_disconnect(&self, _socket: Arc<Socket<()>>, _reason: DisconnectReason) {}
    fn on_message(self: &Arc<Self>, _msg: Str, _socket: Arc<Socket<()>>) {}
    fn on_binary(self: &Arc<Self>, _data: Bytes, _socket: Arc<Socket<()>>) {}
}

/// A GET of Engine.IO 3 long-polling with `query`; the answer's body, within 1 s.
async fn get(svc: &mut EngineIoService<SocketHandler>, query: &str) -> String {
    let req = Request::builder()
        .uri(format!("http://127.0.0.1/engine.io/?EIO=3&transport=polling&{query}"))
        .body(Full::new(VecDeque::<u8>::new()))
        .unwrap();
    let res = svc.call(req);
    let body = tokio::time::timeout(Duration::from_secs(1), async move {
        res.await.unwrap().body_mut().collect().await.unwrap().to_bytes()
    })
    .await
    .expect("a poll with packets waiting is answered at once");
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn payloads_count_utf16_units_binary_goes_in_base64_and_what_does_not_fit_waits() {
    let (socket_tx, mut socket_rx) = mpsc::channel(1);
    let config = EngineIoConfig::builder()
        .ping_interval(Duration::from_secs(60))
        .ping_timeout(Duration::from_secs(60))
        .max_payload(40)
        .build();
    let mut svc = EngineIoService::with_config(Arc::new(SocketHandler { socket_tx }), config);

    let open = get(&mut svc, "b64=1").await;
    let (length, packet) = open.split_once(':').expect("a length-prefixed open packet");
    assert_eq!(length.parse::<usize>().unwrap(), packet.len(), "the open packet is ASCII");
    let sid = packet
        .strip_prefix("0{\"sid\":\"")
        .and_then(|rest| rest.split('"').next())
        .expect("the session id first");
    let sid = format!("sid={sid}&b64=1");
    let socket = socket_rx.recv().await.unwrap();

    // "4" and 5 characters, 6 UTF-16 code units (the mathematical S is 2),
    // 9 bytes in UTF-8.
    socket.emit("\u{1d54a} ok").unwrap();
    socket.emit_binary(Bytes::from_static(&[1, 2, 3])).unwrap();
    // 29 bytes framed: after the 18 above, over the 40 of max_payload.
    let long = "x".repeat(25);
    socket.emit(long.clone()).unwrap();

    assert_eq!(get(&mut svc, &sid).await, "6:4\u{1d54a} ok6:b4AQID");
    assert_eq!(
        socket.queued_bytes(),
        1 + long.len(),
        "the packet that did not fit still waits for the client"
    );
    assert_eq!(get(&mut svc, &sid).await, format!("26:4{long}"));
    assert_eq!(socket.queued_bytes(), 0, "nothing waits any more");
}
