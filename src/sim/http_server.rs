//! NapCat's HTTP API server (`httpServers`, `network/http-server.ts`), on its own listener.
//!
//! Express middleware order decides what a client sees first, so the simulator keeps it:
//! CORS preflight, then the body (a urlencoded form, else JSON for any content type: a
//! syntax error is `400 Invalid JSON` before any token check), then the token (`403
//! {"message":"token verify failed!"}`, missing and wrong alike), then "switched off"
//! (`Server is closed`, HTTP 200), then `/` (a banner) or the action named by the first path
//! segment. An unknown action is HTTP 200 with retcode 200. Every reply carries an `echo`:
//! the request's, else a random base-36 string (NapCat's `Math.random().toString(36)`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::api::{self, UNSUPPORTED_API};
use super::frames;
use super::process::{self, lock, Listener, Shared};
use super::query;

/// Largest request body read; a bigger one is answered 413. (NapCat allows 5000 MB; the
/// simulator only needs a bound.)
const BODY_LIMIT: usize = 8 << 20;
/// Most request records kept (oldest forgotten first).
const LOG_LIMIT: usize = 4096;

/// The banner `GET /` answers (`OB11Response.ok({})` with its message replaced, so
/// `wording` stays empty).
const BANNER: &str = r#"{"status":"ok","retcode":0,"data":{},"message":"NapCat4 Is Running","wording":"","echo":null,"stream":"normal-action"}"#;
/// The reply to a request on a kept-alive connection after the server was switched off.
pub(crate) const SERVER_CLOSED: &str = r#"{"status":"failed","retcode":200,"data":null,"message":"Server is closed","wording":"Server is closed","echo":null,"stream":"normal-action"}"#;
/// The 403 body for a missing or wrong token (sent as `text/html`, Express's default for a
/// string).
const TOKEN_FAILED: &str = r#"{"message":"token verify failed!"}"#;

/// How to start the simulated HTTP API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpServerConfig {
    /// Where to listen; port 0 picks one (kept across disable/enable and restarts).
    pub addr: SocketAddr,
    /// Access token (`Authorization: Bearer T` or `?access_token=T`); `None` or empty
    /// accepts everyone.
    pub token: Option<String>,
}

impl Default for HttpServerConfig {
    /// `127.0.0.1:0`, no token.
    fn default() -> Self {
        HttpServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: None,
        }
    }
}

impl HttpServerConfig {
    /// This config with an access token required.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
}

/// One request that reached the simulated HTTP server, as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target's path (no query).
    pub path: String,
    /// The action: the path's first segment (empty for `/`).
    pub action: String,
    /// The `Authorization` header, verbatim, if any.
    pub authorization: Option<String>,
    /// The `access_token` query parameter, if any.
    pub access_token: Option<String>,
    /// The HTTP status the simulator answered (0 if it never answered: hung, killed).
    pub status: u16,
}

/// The simulated HTTP API server: survives disable/enable and restarts, listening on the
/// same address each time.
pub(crate) struct HttpServer {
    shared: Arc<Shared>,
    /// The bound address (port 0 resolved).
    pub(crate) addr: SocketAddr,
    /// Required token, if any.
    token: Option<String>,
    /// Switched on (NapCat's `isEnable`): off answers `Server is closed` on kept-alive
    /// connections.
    enabled: AtomicBool,
    /// The current listener; `None` while switched off or killed.
    listener: Mutex<Option<Arc<Listener>>>,
    /// Requests per action.
    counts: Mutex<HashMap<String, u64>>,
    /// Recent requests with their ids, oldest first.
    log: Mutex<VecDeque<(u64, HttpRequestRecord)>>,
    /// Id of the next request, to set its status once answered.
    next_id: AtomicU64,
}

impl HttpServer {
    /// Bind `cfg.addr` and serve under `process`.
    pub(crate) fn start(
        shared: &Arc<Shared>,
        cfg: HttpServerConfig,
        process: &CancellationToken,
    ) -> io::Result<Arc<HttpServer>> {
        let socket = process::bind(cfg.addr)?;
        let server = Arc::new(HttpServer {
            shared: Arc::clone(shared),
            addr: socket.local_addr()?,
            token: cfg.token.filter(|t| !t.is_empty()),
            enabled: AtomicBool::new(true),
            listener: Mutex::new(None),
            counts: Mutex::new(HashMap::new()),
            log: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(0),
        });
        server.serve(socket, process);
        Ok(server)
    }

    /// Start the accept loop on `socket`.
    fn serve(self: &Arc<Self>, socket: tokio::net::TcpListener, process: &CancellationToken) {
        let listener = Arc::new(Listener::new(socket, process));
        *lock(&self.listener) = Some(Arc::clone(&listener));
        self.shared
            .tracker
            .spawn(accept_loop(Arc::clone(self), listener, process.clone()));
    }

    /// Listen again on the same address (switched on, or the process restarted).
    pub(crate) fn relisten(self: &Arc<Self>, process: &CancellationToken) -> io::Result<()> {
        self.enabled.store(true, Ordering::SeqCst);
        if lock(&self.listener).is_some() {
            return Ok(());
        }
        let socket = process::bind(self.addr)?;
        self.serve(socket, process);
        Ok(())
    }

    /// Switched off: new connects are refused; kept-alive connections stay and answer
    /// `Server is closed`.
    pub(crate) fn disable(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        self.stop_listening();
    }

    /// Whether the server is switched on.
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Close the listener now (disable, kill, shutdown).
    pub(crate) fn stop_listening(&self) {
        if let Some(listener) = lock(&self.listener).take() {
            listener.close();
        }
    }

    /// Requests whose action (first path segment) was `action`.
    pub(crate) fn count(&self, action: &str) -> u64 {
        lock(&self.counts).get(action).copied().unwrap_or(0)
    }

    /// Recent requests, oldest first.
    pub(crate) fn records(&self) -> Vec<HttpRequestRecord> {
        lock(&self.log).iter().map(|(_, r)| r.clone()).collect()
    }

    /// Answer one request like NapCat's Express app.
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let action = path.split('/').nth(1).unwrap_or("").to_owned();
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *lock(&self.counts).entry(action.clone()).or_insert(0) += 1;
        let record = HttpRequestRecord {
            method: req.method().to_string(),
            path: path.clone(),
            action: action.clone(),
            authorization: authorization.clone(),
            access_token: query::param(&query, "access_token"),
            status: 0,
        };
        {
            let mut log = lock(&self.log);
            if log.len() >= LOG_LIMIT {
                log.pop_front();
            }
            log.push_back((id, record));
        }
        // A hung process reads nothing and answers nothing.
        self.shared.wait_unhung().await;
        let response = self
            .respond(req, &path, &query, &action, authorization)
            .await;
        let status = response.status().as_u16();
        if let Some((_, record)) = lock(&self.log).iter_mut().rev().find(|(i, _)| *i == id) {
            record.status = status;
        }
        response
    }

    async fn respond(
        &self,
        req: Request<Incoming>,
        path: &str,
        query: &str,
        action: &str,
        authorization: Option<String>,
    ) -> Response<Full<Bytes>> {
        if req.method() == Method::OPTIONS {
            return preflight(&req);
        }
        let is_get = req.method() == Method::GET;
        let has_body = req.headers().contains_key(header::CONTENT_LENGTH)
            || req.headers().contains_key(header::TRANSFER_ENCODING);
        let is_form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        let body = match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "request entity too large");
            }
            Err(_) => return text(StatusCode::BAD_REQUEST, "Invalid JSON"),
        };
        // The body's echo as a JSON text (`None`: absent or null).
        let body_echo = if is_form {
            let form = String::from_utf8_lossy(&body);
            query::param(&form, "echo").map(|e| json_string(&e))
        } else if has_body {
            match json_echo(&body) {
                Ok(echo) => echo,
                Err(()) => return text(StatusCode::BAD_REQUEST, "Invalid JSON"),
            }
        } else {
            None
        };
        if let Some(token) = &self.token {
            let presented = query::single_param(query, "access_token")
                .filter(|t| !t.is_empty())
                .or_else(|| {
                    authorization
                        .as_deref()
                        .and_then(|v| v.rsplit("Bearer ").next())
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            if presented != *token {
                return text(StatusCode::FORBIDDEN, TOKEN_FAILED);
            }
        }
        if !self.is_enabled() {
            return json(SERVER_CLOSED.to_owned());
        }
        if path.is_empty() || path == "/" {
            return json(BANNER.to_owned());
        }
        // GET takes the query only; other methods the body with the query on top.
        let query_echo = query::param(query, "echo").map(|e| json_string(&e));
        let echo = match (is_get, query_echo, body_echo) {
            (_, Some(q), _) => q,
            (false, None, Some(b)) => b,
            _ => json_string(&random_echo()),
        };
        match api::data(&self.shared, action) {
            Some(data) => json(frames::reply_ok(&data, &echo)),
            None => json(frames::reply_failed(
                200,
                &format!("{UNSUPPORTED_API}{action}"),
                &echo,
            )),
        }
    }
}

/// Accept connections until the listener closes; each gets a task that lives until the
/// peer leaves or the process dies.
async fn accept_loop(server: Arc<HttpServer>, listener: Arc<Listener>, process: CancellationToken) {
    while let Some(tcp) = listener.accept().await {
        server
            .shared
            .tracker
            .spawn(connection(Arc::clone(&server), tcp, process.clone()));
    }
}

/// Serve one keep-alive connection (HTTP/1.1) until it ends or the process is killed
/// (dropped mid-request: the client sees the connection end without a response).
async fn connection(server: Arc<HttpServer>, tcp: TcpStream, process: CancellationToken) {
    let service = service_fn(move |req| {
        let server = Arc::clone(&server);
        async move { Ok::<_, Infallible>(server.handle(req).await) }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service);
    // Biased: a kill that also ends a hang must not let a held-up response out.
    tokio::select! {
        biased;
        _ = process.cancelled() => {}
        _ = conn => {}
    }
}

/// The `echo` of a JSON body as a JSON text; `Err` for a syntax error. Like NapCat's
/// `{...JSON.parse(body)}`, a body that is valid JSON but not an object has no fields.
fn json_echo(body: &[u8]) -> Result<Option<String>, ()> {
    #[derive(Deserialize)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        echo: Option<&'a RawValue>,
    }
    let text = std::str::from_utf8(body).map_err(|_| ())?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|_| ())?;
    if !text.trim_start().starts_with('{') {
        return Ok(None);
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|_| ())?;
    Ok(fields.echo.map(|e| e.get().to_owned()))
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// What NapCat uses when the request has no echo: 11 base-36 digits.
fn random_echo() -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..11)
        .map(|_| char::from(DIGITS[fastrand::usize(..DIGITS.len())]))
        .collect()
}

/// `res.json(...)`.
fn json(body: String) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json; charset=utf-8",
        Bytes::from(body),
    )
}

/// `res.status(s).send('...')`: Express sends a string as HTML.
fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(
        status,
        "text/html; charset=utf-8",
        Bytes::from_static(body.as_bytes()),
    )
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert("x-powered-by", HeaderValue::from_static("Express"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// `cors()`'s answer to a preflight: 204, before any body or token check.
fn preflight(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header("x-powered-by", "Express")
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")
        .header(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            "GET,HEAD,PUT,PATCH,POST,DELETE",
        );
    if let Some(asked) = req.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        builder = builder.header(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    builder
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_like_napcat() {
        assert_eq!(json_echo(b"").unwrap(), None);
        assert_eq!(
            json_echo(br#"{"echo": {"a" : 1}}"#).unwrap().as_deref(),
            Some(r#"{"a" : 1}"#)
        );
        assert_eq!(json_echo(br#"{"echo":null}"#).unwrap(), None);
        assert_eq!(json_echo(b"[1,2]").unwrap(), None);
        assert!(json_echo(b"{nope").is_err());
        assert!(json_echo(b"\xff").is_err());
        let echo = random_echo();
        assert_eq!(echo.len(), 11);
        assert!(echo
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
    }
}
