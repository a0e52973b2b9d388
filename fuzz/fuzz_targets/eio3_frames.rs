//! What a socket.io 2.x client sends, in Engine.IO 3's framing, through the
//! parsers the frontend runs (engineioxide-core's, with its `v3` feature):
//!
//! - a long-polling payload as text (`<length in UTF-16 units>:<packet>`
//!   repeated) and as binary (`application/octet-stream`: a type byte, the
//!   length in digits of value 0 to 9, `0xff`, the packet), with the
//!   frontend's limit of 32 KiB;
//! - one packet as a websocket text frame carries it.
//!
//! The first byte of the input chooses which; the rest is what arrives.
//! Whatever arrives, nothing panics or runs forever, and what is accepted
//! means what it said: a packet written back parses to the same packet, and
//! a payload whose every packet parsed, encoded again by the server's own
//! encoder, decodes to the same packets.
//!
//! A text payload goes through what the frontend does first: one whose
//! length ends inside a character is refused before the decoder, which
//! would never finish it, reads it (`chat_ha::frontend::splits_a_character`,
//! see `src/frontend/eio3_payload.rs`).
#![no_main]

use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use chat_ha::frontend::splits_a_character;
use engineioxide_core::payload::{self, Payload};
use engineioxide_core::{Packet, PacketBuf, ProtocolVersion};
use futures_util::{StreamExt, stream};
use http::HeaderValue;
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use smallvec::smallvec;

/// The frontend's limit on a long-polling payload (`MAX_PAYLOAD` of
/// `src/frontend/sockets.rs`).
const MAX_PAYLOAD: u64 = 32 * 1024;
/// What a client sends with a binary payload.
const BINARY: HeaderValue = HeaderValue::from_static("application/octet-stream");

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    match choice % 3 {
        0 => check_payload(rest, false),
        1 => check_payload(rest, true),
        _ => check_packet(rest),
    }
});

/// One packet, as a websocket text frame (or one packet of a text payload)
/// holds it.
fn check_packet(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(packet) = Packet::parse(ProtocolVersion::V3, text.to_owned()) else {
        return;
    };
    let written = String::from(packet.clone());
    let again = Packet::parse(ProtocolVersion::V3, written.clone());
    assert_eq!(
        again.ok().as_ref(),
        Some(&packet),
        "{text:?} parsed to {packet:?}, written back as {written:?}"
    );
}

/// A long-polling payload, text or binary.
fn check_payload(data: &[u8], binary: bool) {
    if !binary && splits_a_character(data) {
        return; // refused by the frontend
    }
    let Some(packets) = decode(Bytes::copy_from_slice(data), binary, MAX_PAYLOAD) else {
        return;
    };
    if packets.is_empty() {
        return;
    }
    let encoded = encode(packets.clone(), binary);
    let again = decode(encoded.data.clone(), encoded.has_binary, u64::MAX);
    assert_eq!(
        again.as_ref(),
        Some(&packets),
        "{data:?} decoded to {packets:?}, encoded again as {:?}",
        encoded.data
    );
}

/// Every packet of `body`, a binary payload or a text one, or `None` when
/// one of them is refused. Read as the frontend reads it: up to the first
/// error, which ends the session (the decoder's stream may go on yielding
/// the same error, as nothing more is consumed).
fn decode(body: Bytes, binary: bool, max: u64) -> Option<Vec<Packet>> {
    let binary_type = BINARY;
    let content_type = binary.then_some(&binary_type);
    let packets = payload::decoder(Full::new(body), content_type, ProtocolVersion::V3, max);
    ready(async {
        let mut packets = pin!(packets);
        let mut decoded = Vec::new();
        while let Some(packet) = packets.next().await {
            decoded.push(packet.ok()?);
        }
        Some(decoded)
    })
}

/// `packets` as the frontend answers a long-poll with them: one payload, in
/// binary when the client takes binary and a packet is binary.
fn encode(packets: Vec<Packet>, supports_binary: bool) -> Payload {
    let queued = stream::iter(packets.into_iter().map(|p| -> PacketBuf { smallvec![p] }));
    ready(payload::encoder(
        queued,
        ProtocolVersion::V3,
        supports_binary,
        u64::MAX,
    ))
}

/// The output of `future`, which works on bytes in memory and so never
/// waits: a future that would is a failure of its own.
fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("decoding or encoding bytes in memory waited"),
    }
}
