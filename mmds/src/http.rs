//! The HTTP the guest speaks to the metadata service: a request parser
//! that trusts nothing, and the answers.
//!
//! The subset: HTTP/1.0 and 1.1 requests, one per connection (every
//! answer says `Connection: close`); the request line, headers (names
//! case-insensitive) and a body of `Content-Length` bytes (no chunked
//! bodies); `GET` of a path (the query string ignored) and
//! `PUT /latest/api/token`. Everything else gets 400, 405 or 404.

use serde_json::Value;

use crate::store::{Mmds, Version};

/// The largest request (line, headers and body) a guest may send.
pub const MAX_REQUEST: usize = 16 * 1024;

/// The path a guest asks a V2 session token at.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The header of a token request saying how long it should live.
pub const TTL_HEADER: &str = "x-metadata-token-ttl-seconds";
/// The header a V2 `GET` carries its token in.
pub const TOKEN_HEADER: &str = "x-metadata-token";

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// Header names (lower case) and values (trimmed).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the bytes received so far make.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// A request, and how many bytes it took.
    Done(Request, usize),
    /// Not a request this service takes; answer the status and close.
    Bad(u16, &'static str),
}

/// Parses the request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_REQUEST {
            Parsed::Bad(400, "request too large")
        } else {
            Parsed::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Parsed::Bad(400, "request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Bad(400, "malformed request line");
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Parsed::Bad(400, "unsupported HTTP version");
    }
    if method.is_empty() || !target.starts_with('/') {
        return Parsed::Bad(400, "malformed request line");
    }
    let mut headers = Vec::new();
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            return Parsed::Bad(400, "malformed header");
        };
        if name.is_empty() || name.contains(' ') {
            return Parsed::Bad(400, "malformed header");
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut req = Request {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or(target).to_string(),
        headers,
        body: Vec::new(),
    };
    if req.header("transfer-encoding").is_some() {
        return Parsed::Bad(400, "chunked bodies are not supported");
    }
    let len = match req.header("content-length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_REQUEST.saturating_sub(end + 4) => n,
        Some(Ok(_)) => return Parsed::Bad(400, "request too large"),
        Some(Err(_)) => return Parsed::Bad(400, "bad Content-Length"),
    };
    let start = end + 4;
    let Some(body) = buf.get(start..start + len) else {
        return Parsed::Incomplete;
    };
    req.body = body.to_vec();
    Parsed::Done(req, start + len)
}

/// An answer: status, content type, body, and extra headers.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
    /// Other headers.
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// A plain-text error.
    pub fn error(status: u16, message: &str) -> Self {
        Self::new(status, "text/plain", message)
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&self.body);
        out.into_bytes()
    }
}

/// The answer to `req`.
pub fn respond(mmds: &mut Mmds, req: &Request) -> Response {
    // A request that went through a proxy is refused, as EC2 does: a
    // guest process tricked into forwarding (SSRF) must not reach tokens.
    if req.header("x-forwarded-for").is_some() {
        return Response::error(400, "requests through a proxy are refused");
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("PUT", TOKEN_PATH) => token(mmds, req),
        ("GET", _) => get(mmds, req),
        _ => {
            let mut r = Response::error(405, "only GET, and PUT of a token, are allowed");
            r.headers.push(("Allow", "GET, PUT".into()));
            r
        }
    }
}

fn token(mmds: &mut Mmds, req: &Request) -> Response {
    let Some(ttl) = req.header(TTL_HEADER) else {
        return Response::error(400, "the token TTL header is missing");
    };
    let Ok(ttl) = ttl.parse::<u64>() else {
        return Response::error(400, "the token TTL is not a number");
    };
    match mmds.new_token(ttl) {
        Some(t) => {
            let mut r = Response::new(200, "text/plain", t);
            r.headers
                .push(("X-metadata-token-ttl-seconds", ttl.to_string()));
            r
        }
        None => Response::error(
            400,
            &format!(
                "the token TTL must be 1 to {} seconds",
                crate::store::MAX_TOKEN_TTL
            ),
        ),
    }
}

fn get(mmds: &Mmds, req: &Request) -> Response {
    let token = req.header(TOKEN_HEADER);
    match (mmds.version, token) {
        (Version::V2, None) => return Response::error(401, "no session token"),
        (_, Some(t)) if !mmds.token_valid(t) => {
            return Response::error(401, "the session token is not valid")
        }
        _ => {}
    }
    let Some(value) = mmds.lookup(&req.path) else {
        return Response::error(404, &format!("Resource not found: {}.", req.path));
    };
    let json = !mmds.imds_compat
        && req
            .header("accept")
            .is_some_and(|a| a.contains("application/json"));
    if json {
        return Response::new(200, "application/json", value.to_string());
    }
    Response::new(200, "text/plain", imds_text(value))
}

/// EC2's IMDS format: a string as it is, an object as its keys (one per
/// line; `/` after those holding objects), an array as its indices.
fn imds_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if v.is_object() {
                    format!("{k}/")
                } else {
                    k.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Array(items) => (0..items.len())
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(text: &str) -> Request {
        match parse(text.as_bytes()) {
            Parsed::Done(r, n) => {
                assert_eq!(n, text.len());
                r
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_requests_and_refuses_bad_ones() {
        let r = req("GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\nAccept:  application/json \r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/a/b"));
        assert_eq!(r.header("accept"), Some("application/json"));
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: h\r\n"), Parsed::Incomplete);
        let put = "PUT /latest/api/token HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(parse(&put.as_bytes()[..put.len() - 1]), Parsed::Incomplete);
        assert_eq!(req(put).body, b"abc");
        for bad in [
            "GET /\r\n\r\n",
            "GET / HTTP/2\r\n\r\n",
            "GET x HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bad.as_bytes()), Parsed::Bad(400, _)),
                "{bad:?}"
            );
        }
        assert!(matches!(parse(&[b'a'; MAX_REQUEST]), Parsed::Bad(400, _)));
    }

    #[test]
    fn answers_v1_and_v2() {
        let mut m = Mmds::default();
        m.put(json!({"latest": {"meta-data": {"id": "i-1", "net": {"a": 1}}}}))
            .unwrap();
        let r = respond(&mut m, &req("GET /latest/meta-data HTTP/1.1\r\n\r\n"));
        assert_eq!((r.status, r.body.as_str()), (200, "id\nnet/"));
        let r = respond(&mut m, &req("GET /latest/meta-data/id HTTP/1.1\r\n\r\n"));
        assert_eq!(r.body, "i-1");
        let r = respond(
            &mut m,
            &req("GET /latest/meta-data/net HTTP/1.1\r\nAccept: application/json\r\n\r\n"),
        );
        assert_eq!(
            (r.content_type, r.body.as_str()),
            ("application/json", "{\"a\":1}")
        );
        assert_eq!(
            respond(&mut m, &req("GET /nope HTTP/1.1\r\n\r\n")).status,
            404
        );
        assert_eq!(respond(&mut m, &req("POST / HTTP/1.1\r\n\r\n")).status, 405);
        m.version = Version::V2;
        assert_eq!(respond(&mut m, &req("GET / HTTP/1.1\r\n\r\n")).status, 401);
        let t = respond(
            &mut m,
            &req("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n"),
        );
        assert_eq!(t.status, 200);
        let get = format!(
            "GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {}\r\n\r\n",
            t.body
        );
        assert_eq!(respond(&mut m, &req(&get)).body, "i-1");
        let bad = "GET / HTTP/1.1\r\nX-metadata-token: 00\r\n\r\n";
        assert_eq!(respond(&mut m, &req(bad)).status, 401);
        for ttl in ["0", "21601", "x"] {
            let put = format!(
                "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n"
            );
            assert_eq!(respond(&mut m, &req(&put)).status, 400, "{ttl}");
        }
        let proxied = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        assert_eq!(respond(&mut m, &req(proxied)).status, 400);
    }
}
