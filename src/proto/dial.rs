//! Dialling a OneBot backend's WebSocket server: lifeguard's own client handshake, done
//! on a raw `TcpStream` so that bytes the backend sends right after its 101 (usually the
//! `connect` event) are handed over, never lost. Used by the forward relay for each
//! session and by the probes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Secret, UpstreamUrl};
use crate::proto::{auth, ws};

/// Why a handshake with the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the backend: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backend did not complete the handshake in time")]
    Timeout,
    #[error("the backend answered HTTP {0} instead of 101")]
    Status(u16),
    #[error("the backend's handshake is invalid: {0}")]
    Invalid(&'static str),
}

impl ConnectError {
    /// This machine, not the backend, is out of something (descriptors, buffers, memory):
    /// never a reason to call the backend unhealthy.
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::Io(e) if is_local_exhaustion(e))
    }
}

/// Out of file descriptors (process or system), socket buffers or memory.
pub fn is_local_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// An open WebSocket connection to the backend, as raw bytes.
pub struct Connected {
    pub stream: TcpStream,
    /// Bytes the backend sent right after its 101 (often the connect event).
    pub leftover: Vec<u8>,
}

/// One client handshake: where to, with which request target and headers.
pub struct Dial<'a> {
    pub host: &'a str,
    pub port: u16,
    /// `host:port` for the Host header.
    pub authority: String,
    /// The request target: path and query.
    pub target: String,
    /// `Authorization: Bearer <token>` when set.
    pub bearer: Option<&'a Secret>,
    /// Headers sent as they are (the reverse relay forwards the backend's `X-Self-ID`,
    /// `X-Client-Role` and `User-Agent`); a `User-Agent` here replaces lifeguard's own.
    pub headers: &'a [(&'a str, &'a str)],
}

/// Open a WebSocket to the backend on `path_and_query` (`/api`, `/event?x=1`, ...),
/// presenting `token` as a Bearer header and as `access_token` in the query.
pub async fn connect(
    up: &UpstreamUrl,
    path_and_query: &str,
    token: Option<&Secret>,
    timeout: Duration,
) -> Result<Connected, ConnectError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut target = format!(
        "{}{}",
        up.base_path,
        if path.is_empty() { "/" } else { path }
    );
    let mut params: Vec<&str> = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|kv| !kv.is_empty() && !kv.starts_with("access_token="))
        .collect();
    let token_param;
    if let Some(t) = token {
        token_param = format!("access_token={}", auth::query_value(t.expose()));
        params.push(&token_param);
    }
    if !params.is_empty() {
        target.push('?');
        target.push_str(&params.join("&"));
    }
    let dial = Dial {
        host: &up.host,
        port: up.port,
        authority: up.authority(),
        target,
        bearer: token,
        headers: &[],
    };
    open(&dial, timeout).await
}

/// Perform `dial` within `timeout` (TCP connect and handshake together).
pub async fn open(dial: &Dial<'_>, timeout: Duration) -> Result<Connected, ConnectError> {
    tokio::time::timeout(timeout, open_inner(dial))
        .await
        .map_err(|_| ConnectError::Timeout)?
}

async fn open_inner(d: &Dial<'_>) -> Result<Connected, ConnectError> {
    let mut stream = TcpStream::connect((d.host, d.port)).await?;
    stream.set_nodelay(true)?;
    let key = ws::new_key();
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        d.target, d.authority,
    );
    if !d
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
    {
        req.push_str(concat!(
            "User-Agent: lifeguard/",
            env!("CARGO_PKG_VERSION"),
            "\r\n"
        ));
    }
    for (name, value) in d.headers {
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(ConnectError::Invalid("a header value holds a line break"));
        }
        req.push_str(name);
        req.push_str(": ");
        req.push_str(value);
        req.push_str("\r\n");
    }
    if let Some(t) = d.bearer {
        req.push_str("Authorization: Bearer ");
        req.push_str(t.expose());
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;

    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() > 16 * 1024 {
            return Err(ConnectError::Invalid("response headers too large"));
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnectError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the backend closed the connection during the handshake",
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return Err(ConnectError::Invalid("unparsable HTTP response")),
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                if code != 101 {
                    return Err(ConnectError::Status(code));
                }
                let accept = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                    .map(|h| h.value)
                    .ok_or(ConnectError::Invalid("no Sec-WebSocket-Accept"))?;
                if accept != ws::accept_key(key.as_bytes()).as_bytes() {
                    return Err(ConnectError::Invalid("wrong Sec-WebSocket-Accept"));
                }
                if resp
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
                {
                    return Err(ConnectError::Invalid(
                        "the backend negotiated an extension nobody asked for",
                    ));
                }
                let leftover = buf[len..].to_vec();
                return Ok(Connected { stream, leftover });
            }
        }
    }
}
