//! Engine.IO 3 long-polling payloads, checked before engineioxide reads them.
//!
//! A socket.io 2.x client posts its packets as text, each preceded by its
//! length in UTF-16 code units and a colon: `5:42[1]`. engineioxide-core's
//! decoder of that framing (0.2.3) never returns when a length ends in the
//! middle of a character that UTF-16 writes as two units (a surrogate pair,
//! e.g. an emoji): it cuts the packet after the whole character, finds one
//! unit too many, and tries again with the same bytes, forever. The
//! frontend's runtime is single-threaded, so one such post of a few bytes
//! stopped the whole instance and every client on it.
//!
//! The frontend therefore reads such a post itself first (it is at most
//! [`MAX_PAYLOAD`] bytes, which engineioxide would buffer as well) and
//! walks its framing exactly as that decoder does. A payload whose length
//! ends inside a character is replaced by one the decoder refuses at once,
//! so the session ends as for any other garbage in its framing; every
//! other payload reaches engineioxide unchanged.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::Method;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::Response;

use super::SOCKET_IO_PATH;
use super::sockets::MAX_PAYLOAD;

/// A payload engineioxide refuses as soon as it reads it (no length before
/// a colon), ending the session that sent it.
const REFUSED: &[u8] = b"x";

/// Checks the Engine.IO 3 text payloads of long-polling posts; passes every
/// other request on as it came.
pub async fn check_posts(request: Request, next: Next) -> Response {
    if !is_eio3_text_post(&request) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::try_from(MAX_PAYLOAD).unwrap_or(usize::MAX))
        .await
    {
        Ok(payload) if splits_a_character(&payload) => Body::from(REFUSED),
        Ok(payload) => Body::from(payload),
        // Too large, or the client went away: a body as large as the one
        // engineioxide refuses, so the outcome is its own.
        Err(_) => Body::from(Bytes::from(vec![b'0'; too_large()])),
    };
    next.run(Request::from_parts(parts, body)).await
}

/// One byte more than engineioxide takes in a long-polling payload.
fn too_large() -> usize {
    usize::try_from(MAX_PAYLOAD).unwrap_or(usize::MAX - 1) + 1
}

/// A long-polling post of Engine.IO 3 packets as text (a binary payload,
/// `application/octet-stream`, counts bytes and is not affected).
fn is_eio3_text_post(request: &Request) -> bool {
    let uri = request.uri();
    let query = uri.query().unwrap_or("");
    let has = |pair: &str| query.split('&').any(|p| p == pair);
    request.method() == Method::POST
        && uri.path().starts_with(SOCKET_IO_PATH)
        && has("EIO=3")
        && !has("transport=websocket")
        && request
            .headers()
            .get(CONTENT_TYPE)
            .is_none_or(|t| t.as_bytes() != b"application/octet-stream")
}

/// Whether a length of `payload`'s framing, read as engineioxide-core's
/// decoder reads it, ends inside a character written as two UTF-16 units:
/// the payload that decoder would never finish.
///
/// It stops, answering false, wherever the decoder stops with an error or
/// at the end (no colon, a length that is not a number, a packet cut
/// short): those payloads it refuses or ends by itself.
pub fn splits_a_character(payload: &[u8]) -> bool {
    let mut rest = payload;
    while !rest.is_empty() {
        let Some(colon) = rest.iter().position(|&b| b == b':') else {
            return false;
        };
        let Some(units) = std::str::from_utf8(&rest[..colon])
            .ok()
            .and_then(|digits| digits.parse::<usize>().ok())
        else {
            return false;
        };
        rest = &rest[colon + 1..];
        if units == 0 {
            continue;
        }
        match packet_end(valid_prefix(rest), units) {
            PacketEnd::At(end) => rest = &rest[end..],
            PacketEnd::InsideACharacter => return true,
            PacketEnd::CutShort => return false,
        }
    }
    false
}

/// Where a packet of `units` UTF-16 code units ends in `text`.
#[derive(Debug, PartialEq, Eq)]
enum PacketEnd {
    /// At this byte offset.
    At(usize),
    /// Between the two units of one character.
    InsideACharacter,
    /// `text` is shorter.
    CutShort,
}

fn packet_end(text: &str, units: usize) -> PacketEnd {
    let mut counted = 0;
    for (at, c) in text.char_indices() {
        counted += c.len_utf16();
        if counted == units {
            return PacketEnd::At(at + c.len_utf8());
        }
        if counted > units {
            return PacketEnd::InsideACharacter;
        }
    }
    PacketEnd::CutShort
}

/// The longest start of `bytes` that is UTF-8, as the decoder reads it.
fn valid_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_length_inside_a_surrogate_pair_is_found() {
        // 13 units end between the two halves of the emoji.
        assert!(splits_a_character("13:42[\"room\",\"ü😀x\"]".as_bytes()));
        // What the fuzz target found.
        assert!(splits_a_character(
            "17:42[\"ro\u{1}\0\0\0om\",\"ü😀x\"]".as_bytes()
        ));
        assert!(splits_a_character("1:😀".as_bytes()));
        // In a later packet too.
        assert!(splits_a_character("1:22:4😀".as_bytes()));
        assert!(splits_a_character("1:20:1:😀".as_bytes()));
    }

    #[test]
    fn payloads_the_decoder_reads_or_refuses_pass() {
        for payload in [
            "19:420[\"room\",\"lobby\"]",
            "1:237:421[\"room\",{\"room\":\"a\",\"since\":null}]",
            // The emoji is two units, the umlaut one.
            "17:42[\"room\",\"ü😀x\"]",
            "2:😀",
            "0:",
            "99:42",
            "x",
            "",
            "4:4\u{fffd}",
        ] {
            assert!(!splits_a_character(payload.as_bytes()), "{payload:?}");
        }
        // Not UTF-8 after the packet: the decoder reads the packet, then
        // stops at the bytes.
        assert!(!splits_a_character(b"1:2\xff\xfe"));
    }

    #[test]
    fn only_engine_io_3_text_posts_are_read_first() {
        let post = |uri: &str, content_type: Option<&str>| {
            let mut builder = Request::builder().method(Method::POST).uri(uri);
            if let Some(t) = content_type {
                builder = builder.header(CONTENT_TYPE, t);
            }
            builder.body(Body::empty()).unwrap()
        };
        let v3 = "/front/socket.io/?EIO=3&transport=polling&sid=abc";
        assert!(is_eio3_text_post(&post(
            v3,
            Some("text/plain;charset=UTF-8")
        )));
        assert!(is_eio3_text_post(&post(v3, None)));
        assert!(!is_eio3_text_post(&post(
            v3,
            Some("application/octet-stream")
        )));
        assert!(!is_eio3_text_post(&post(
            "/front/socket.io/?EIO=4&transport=polling&sid=abc",
            None
        )));
        assert!(!is_eio3_text_post(&post("/back/message?EIO=3", None)));
        let get = Request::builder().uri(v3).body(Body::empty()).unwrap();
        assert!(!is_eio3_text_post(&get));
    }
}
