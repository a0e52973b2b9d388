//! Trims a Socket.IO request before socketioxide sees it, because Engine.IO
//! keeps the request's parts for the whole life of the session it opens.
//!
//! hyper parses a request in place: the URI and every header value are
//! slices of the connection's read buffer (8 KiB), which the kept parts would
//! keep alive for every websocket, long after hyper handed the connection
//! over. And a browser's headers (cookies, user agent, …) often weigh a
//! kilobyte or more, which every socket would keep for nothing.
//!
//! So the URI is copied, and only the headers Engine.IO reads are kept:
//! `Sec-WebSocket-Key` (to answer a websocket upgrade) and `Content-Type` (of
//! a long-polling post). Nothing in the frontend reads other headers of a
//! socket (`SocketRef::req_parts`); a handler that needs one must add it to
//! [`KEPT`].
//!
//! What the frontend needs to know of the client, its address, is worked
//! out here and kept as the one `X-Forwarded-For` value of the trimmed
//! request ([`ClientAddress`]); the peer's address, which the server put
//! among the request's extensions, goes (it would keep a map alive).

use std::net::IpAddr;

use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_TYPE, SEC_WEBSOCKET_KEY};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};

use super::SOCKET_IO_PATH;
use crate::serve::Peer;

/// The address of the client a Socket.IO request came from: the last
/// `X-Forwarded-For` value, which the load balancer in front appends (and
/// HAProxy's configuration deletes what the client sent), else the peer's
/// own address. Only the load balancers may connect at all (`access.allow`),
/// so the header is theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub IpAddr);

impl ClientAddress {
    /// Works it out from a request as received.
    fn of<B>(request: &Request<B>) -> Option<Self> {
        let peer = request.extensions().get::<Peer>().map(|p| p.0.ip());
        Self::forwarded(request.headers())
            .or(peer)
            .map(|a| ClientAddress(a.to_canonical()))
    }

    /// The one a trimmed request keeps (see [`trim_socket_io`]).
    pub fn kept(headers: &HeaderMap) -> Option<Self> {
        Self::forwarded(headers).map(ClientAddress)
    }

    /// The last address of the last `X-Forwarded-For` header.
    fn forwarded(headers: &HeaderMap) -> Option<IpAddr> {
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .next_back()
            .and_then(|value| value.to_str().ok())
            .and_then(|list| list.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok())
    }
}

/// The header a trimmed request keeps its client's address in.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The headers a Socket.IO request keeps.
const KEPT: [HeaderName; 2] = [SEC_WEBSOCKET_KEY, CONTENT_TYPE];

/// Applied to every request; trims only those to the Socket.IO endpoint.
pub fn trim_socket_io(mut request: Request<Body>) -> Request<Body> {
    if request.uri().path().starts_with(SOCKET_IO_PATH) {
        trim(&mut request);
    }
    request
}

/// Replaces the URI and the kept header values by slices of one fresh
/// buffer, drops the other headers, and keeps the client's address as the
/// one value of `X-Forwarded-For`.
fn trim<B>(request: &mut Request<B>) {
    let client = ClientAddress::of(request).map(|c| c.0.to_string());
    forget_peer(request);
    let old = std::mem::take(request.headers_mut());
    let mut kept: Vec<(HeaderName, &[u8])> = KEPT
        .iter()
        .filter_map(|name| old.get(name).map(|value| (name.clone(), value.as_bytes())))
        .collect();
    if let Some(client) = &client {
        kept.push((X_FORWARDED_FOR, client.as_bytes()));
    }
    let uri = request.uri().to_string();
    let size = uri.len() + kept.iter().map(|(_, v)| v.len()).sum::<usize>();
    let mut text = Vec::with_capacity(size);
    text.extend_from_slice(uri.as_bytes());
    for (_, value) in &kept {
        text.extend_from_slice(value);
    }
    let text = Bytes::from(text);

    if let Ok(copied) = Uri::from_maybe_shared(text.slice(..uri.len())) {
        *request.uri_mut() = copied;
    }
    let mut headers = HeaderMap::with_capacity(kept.len());
    let mut at = uri.len();
    for (name, value) in kept {
        let end = at + value.len();
        // The bytes were valid in the original, and an address is.
        if let Ok(copied) = HeaderValue::from_maybe_shared(text.slice(at..end)) {
            headers.insert(name, copied);
        }
        at = end;
    }
    *request.headers_mut() = headers;
}

/// Removes the peer's address from the request's extensions, and the
/// extensions' map with it when nothing else is in it (a long-polling
/// request's): the session keeps the request's parts as long as it lives.
fn forget_peer<B>(request: &mut Request<B>) {
    let mut extensions = std::mem::take(request.extensions_mut());
    extensions.remove::<Peer>();
    if !extensions.is_empty() {
        *request.extensions_mut() = extensions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_uri_and_the_headers_engine_io_reads_in_a_buffer_of_their_own() {
        let buffer = Bytes::from_static(
            b"/front/socket.io/?EIO=4&transport=websocketdGhlIHNhbXBsZSBub25jZQ==",
        );
        let uri = Uri::from_maybe_shared(buffer.slice(..43)).unwrap();
        let key = HeaderValue::from_maybe_shared(buffer.slice(43..)).unwrap();
        let mut request = Request::builder()
            .uri(uri)
            .header("sec-websocket-key", key)
            .header("cookie", "a=1")
            .header("content-type", "text/plain;charset=UTF-8")
            .body(())
            .unwrap();

        trim(&mut request);

        assert_eq!(
            request.uri().to_string(),
            "/front/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(request.uri().query(), Some("EIO=4&transport=websocket"));
        let headers = request.headers();
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(headers["content-type"], "text/plain;charset=UTF-8");
        let original = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        let key_at = headers["sec-websocket-key"].as_bytes().as_ptr() as usize;
        let path_at = request.uri().path().as_ptr() as usize;
        assert!(!original.contains(&key_at) && !original.contains(&path_at));
    }

    #[test]
    fn the_client_is_the_last_forwarded_address_else_the_peer() {
        let peer = Peer("127.0.0.1:40000".parse().unwrap());
        let client = |forwarded: &[&str]| {
            let mut request = Request::builder().uri("/front/socket.io/?EIO=4");
            for value in forwarded {
                request = request.header("x-forwarded-for", *value);
            }
            let mut request = request.extension(peer).body(()).unwrap();
            trim(&mut request);
            assert!(request.extensions().is_empty(), "the peer is forgotten");
            let kept = request.headers().get_all("x-forwarded-for").iter().count();
            assert_eq!(kept, 1, "one address kept");
            ClientAddress::kept(request.headers())
                .unwrap()
                .0
                .to_string()
        };
        assert_eq!(client(&[]), "127.0.0.1");
        assert_eq!(client(&["203.0.113.7"]), "203.0.113.7");
        assert_eq!(client(&["1.2.3.4, 203.0.113.7"]), "203.0.113.7");
        assert_eq!(client(&["1.2.3.4", "2001:db8::1"]), "2001:db8::1");
        assert_eq!(client(&["::ffff:198.51.100.1"]), "198.51.100.1");
        assert_eq!(client(&["garbage"]), "127.0.0.1", "unparsable: the peer");
    }

    #[test]
    fn other_requests_are_left_alone() {
        let request = Request::builder()
            .uri("/front/status")
            .header("cookie", "a=1")
            .body(Body::empty())
            .unwrap();
        let request = trim_socket_io(request);
        assert_eq!(request.headers()["cookie"], "a=1");
    }
}
