//! Copies a Socket.IO request's URI and headers out of the connection's
//! read buffer before the request reaches socketioxide.
//!
//! hyper parses a request in place: the URI and every header value are
//! slices of the connection's read buffer (8 KiB). Engine.IO keeps the
//! request's parts for the whole life of its session, so those slices would
//! keep the whole buffer alive for every websocket, long after hyper handed
//! the connection over. One compact copy (a few hundred bytes) frees it.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Request, Uri};

use super::SOCKET_IO_PATH;

/// Applied to every request; rewrites only those to the Socket.IO endpoint.
pub fn compact_socket_io(mut request: Request<Body>) -> Request<Body> {
    if request.uri().path().starts_with(SOCKET_IO_PATH) {
        compact(&mut request);
    }
    request
}

/// Replaces the URI and header values by slices of one fresh buffer.
fn compact<B>(request: &mut Request<B>) {
    let uri = request.uri().to_string();
    let size = uri.len()
        + request
            .headers()
            .values()
            .map(|v| v.as_bytes().len())
            .sum::<usize>();
    let mut text = Vec::with_capacity(size);
    text.extend_from_slice(uri.as_bytes());
    for value in request.headers().values() {
        text.extend_from_slice(value.as_bytes());
    }
    let text = Bytes::from(text);

    if let Ok(copied) = Uri::from_maybe_shared(text.slice(..uri.len())) {
        *request.uri_mut() = copied;
    }
    let old = std::mem::take(request.headers_mut());
    let mut headers = HeaderMap::with_capacity(old.len());
    let mut at = uri.len();
    for (name, value) in &old {
        let len = value.as_bytes().len();
        // The bytes were valid in the original; keep that one if not.
        let copied =
            HeaderValue::from_maybe_shared(text.slice(at..at + len)).unwrap_or(value.clone());
        at += len;
        headers.append(name.clone(), copied);
    }
    *request.headers_mut() = headers;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_uri_and_headers_but_not_the_original_buffer() {
        let buffer = Bytes::from_static(b"/front/socket.io/?EIO=4&transport=websocketwebsocketXYZ");
        let uri = Uri::from_maybe_shared(buffer.slice(..43)).unwrap();
        let mut request = Request::builder().uri(uri).body(()).unwrap();
        let headers = request.headers_mut();
        headers.append(
            "upgrade",
            HeaderValue::from_maybe_shared(buffer.slice(43..52)).unwrap(),
        );
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));

        compact(&mut request);

        assert_eq!(
            request.uri().to_string(),
            "/front/socket.io/?EIO=4&transport=websocket"
        );
        assert_eq!(request.uri().query(), Some("EIO=4&transport=websocket"));
        assert_eq!(request.headers()["upgrade"], "websocket");
        let all: Vec<_> = request.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        let original = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
        assert!(!original.contains(&(request.headers()["upgrade"].as_bytes().as_ptr() as usize)));
    }
}
