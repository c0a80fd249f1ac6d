//! A small, strict HTTP/1.1 request parser and response writer: just what
//! the API needs (requests with a `Content-Length` body, keep-alive,
//! `Expect: 100-continue`), with hard limits on every size.

use std::fmt::Write as _;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted.
pub const MAX_BODY: usize = 50 * 1024;
/// The body limit in force: [`MAX_BODY`] unless [`set_max_body`] changed
/// it (Firecracker's `--http-api-max-payload-size`).
static BODY_LIMIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(MAX_BODY);

/// Sets the largest request body accepted from now on (process-wide).
pub fn set_max_body(bytes: usize) {
    BODY_LIMIT.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// The largest request body accepted now.
pub fn max_body() -> usize {
    BODY_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Most header lines accepted.
const MAX_HEADERS: usize = 64;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, `PATCH`, ...
    pub method: String,
    /// The request target's path (a query string is refused).
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request
    /// (`Connection: close`, or HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// A request that cannot be served: the status and a message for the
/// client. The connection is closed after it is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status code (4xx).
    pub status: u16,
    /// What is wrong.
    pub message: String,
}

impl HttpError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

/// Result of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `continue_wanted`: the head is complete and
    /// asks for `100 Continue` before the body is sent.
    Incomplete {
        /// Send `100 Continue` (once).
        continue_wanted: bool,
    },
    /// A whole request, and how many bytes of the buffer it used.
    Complete(Request, usize),
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses one request from the front of `buf`: the head (request line,
/// then headers), then as much body as the head announces.
pub fn parse(buf: &[u8]) -> Result<Parsed, HttpError> {
    let head_too_large = || HttpError {
        status: 431,
        message: format!("request head is larger than {MAX_HEAD} bytes"),
    };
    let Some(head_end) = find_head_end(buf) else {
        if buf.len() > MAX_HEAD {
            return Err(head_too_large());
        }
        return Ok(Parsed::Incomplete {
            continue_wanted: false,
        });
    };
    if head_end > MAX_HEAD {
        return Err(head_too_large());
    }
    let head = std::str::from_utf8(&buf[..head_end - 4])
        .map_err(|_| HttpError::bad("request head is not valid UTF-8"))?;
    let mut lines = head.split("\r\n");
    let (method, target, http10) = request_line(lines.next().unwrap_or_default())?;
    let headers = Headers::parse(lines, http10)?;
    let total = head_end + headers.content_length.unwrap_or(0);
    if buf.len() < total {
        return Ok(Parsed::Incomplete {
            continue_wanted: headers.expect_continue && buf.len() == head_end,
        });
    }
    Ok(Parsed::Complete(
        Request {
            method: method.to_string(),
            path: target.to_string(),
            body: buf[head_end..total].to_vec(),
            close: headers.close,
        },
        total,
    ))
}

/// The request line's method and target, and whether it is HTTP/1.0.
fn request_line(line: &str) -> Result<(&str, &str, bool), HttpError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::bad(format!(
            "malformed request line '{}'",
            line.escape_default()
        )));
    };
    if !is_token(method) {
        return Err(HttpError::bad("malformed request method"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => {
            return Err(HttpError {
                status: 505,
                message: format!("unsupported HTTP version '{}'", version.escape_default()),
            })
        }
    };
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(HttpError::bad("malformed request target"));
    }
    if target.contains('?') || target.contains('#') {
        return Err(HttpError::bad("query strings are not supported"));
    }
    Ok((method, target, http10))
}

/// What the headers say about the body and the connection.
struct Headers {
    content_length: Option<usize>,
    close: bool,
    expect_continue: bool,
}

impl Headers {
    /// Reads the header `lines`; `http10`: the connection closes unless
    /// the client asks to keep it.
    fn parse<'a>(lines: impl Iterator<Item = &'a str>, http10: bool) -> Result<Self, HttpError> {
        let mut h = Self {
            content_length: None,
            close: http10,
            expect_continue: false,
        };
        for (n, line) in lines.enumerate() {
            if n >= MAX_HEADERS {
                return Err(HttpError {
                    status: 431,
                    message: format!("more than {MAX_HEADERS} header lines"),
                });
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(HttpError::bad(format!(
                    "malformed header line '{}'",
                    line.escape_default()
                )));
            };
            if !is_token(name) {
                return Err(HttpError::bad("malformed header name"));
            }
            h.header(&name.to_ascii_lowercase(), value.trim_matches([' ', '\t']))?;
        }
        Ok(h)
    }

    /// Takes one header (`name` in lower case).
    fn header(&mut self, name: &str, value: &str) -> Result<(), HttpError> {
        match name {
            "content-length" => self.content_length = Some(self.content_length(value)?),
            "transfer-encoding" => {
                return Err(HttpError {
                    status: 501,
                    message: "Transfer-Encoding is not supported; send a Content-Length"
                        .to_string(),
                })
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.split(',').any(|t| t.trim() == "close") {
                    self.close = true;
                } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                    self.close = false;
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    self.expect_continue = true;
                } else {
                    return Err(HttpError {
                        status: 417,
                        message: "unsupported Expect header".to_string(),
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A Content-Length `value`: digits only, the same as any earlier
    /// one, within the body limit.
    fn content_length(&self, value: &str) -> Result<usize, HttpError> {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::bad("invalid Content-Length"));
        }
        let len: usize = value.parse().unwrap_or(usize::MAX);
        if self.content_length.is_some_and(|l| l != len) {
            return Err(HttpError::bad("conflicting Content-Length headers"));
        }
        let limit = max_body();
        if len > limit {
            return Err(HttpError {
                status: 413,
                message: format!(
                    "request body of {value} bytes is larger than the limit of {limit} bytes"
                ),
            });
        }
        Ok(len)
    }
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// `200 OK` with a JSON body.
    pub fn json(body: String) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// An error with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: impl AsRef<str>) -> Self {
        let body = serde_json::json!({ "fault_message": message.as_ref() }).to_string();
        Self {
            status,
            body: Some(body),
        }
    }

    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut s = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        s.push_str("Server: capsule\r\n");
        if close {
            s.push_str("Connection: close\r\n");
        }
        match &self.body {
            Some(b) => {
                let _ = write!(
                    s,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                );
            }
            // No body, but the media type every answer of the API has
            // (Firecracker's spec declares application/json for all of
            // them, and schema checkers hold a 204 to it).
            None if self.status == 204 => s.push_str("Content-Type: application/json\r\n\r\n"),
            None => s.push_str("Content-Length: 0\r\n\r\n"),
        }
        s.into_bytes()
    }
}

/// The reason phrase for a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            other => panic!("not complete: {other:?}"),
        }
    }

    fn status(buf: &[u8]) -> u16 {
        match parse(buf) {
            Err(e) => e.status,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn simple_requests() {
        let (r, n) = complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str(), n), ("GET", "/", 27));
        assert!(!r.close && r.body.is_empty());
        let buf = b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}GET";
        let (r, n) = complete(buf);
        assert_eq!(r.body, b"{}");
        assert!(r.close);
        assert_eq!(&buf[n..], b"GET");
        let (r, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert!(r.close);
    }

    #[test]
    fn incomplete_and_continue() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n").unwrap(),
            Parsed::Incomplete {
                continue_wanted: false
            }
        );
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            parse(head).unwrap(),
            Parsed::Incomplete {
                continue_wanted: true
            }
        );
        let mut more = head.to_vec();
        more.extend(b"ab");
        assert_eq!(
            parse(&more).unwrap(),
            Parsed::Incomplete {
                continue_wanted: false
            }
        );
    }

    #[test]
    fn bad_requests() {
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status(b"GET  / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /?a=1 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"G(T / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"), 400);
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(status(b"PUT / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(status(&[b'A'; MAX_HEAD + 1]), 431);
        assert_eq!(status(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n"), 400);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "A: b\r\n".repeat(70));
        assert_eq!(status(many.as_bytes()), 431);
    }

    #[test]
    fn responses() {
        let r = Response::fault(400, "bad \"thing\"");
        let text = String::from_utf8(r.to_bytes(true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with(r#"{"fault_message":"bad \"thing\""}"#));
        let text = String::from_utf8(Response::no_content().to_bytes(false)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: capsule\r\nContent-Type: application/json\r\n\r\n"
        );
    }
}
