//! Answers the host gives itself, before or instead of the component: errors in OpenAI's shape,
//! the metrics page, and the refusal written to a connection over the cap.

use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::StatusCode;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

pub type Response = hyper::Response<HyperOutgoingBody>;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            code: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// A failure inside the server. The message is generic: the details (a wasm backtrace,
    /// paths) go to the server's log, never to the client.
    pub fn internal() -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the server failed to answer this request (the details are in its log)",
        )
    }

    pub fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }});
        let mut resp = full(body.to_string(), "application/json");
        *resp.status_mut() = self.status;
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(RETRY_AFTER, s.into());
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A 200 with this body.
pub fn full(body: String, content_type: &'static str) -> Response {
    let body = Full::new(bytes::Bytes::from(body))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = hyper::Response::new(body);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The whole HTTP/1.1 response written to a connection the server will not serve (over
/// `--max-connections`), before closing it.
pub fn over_capacity(max_connections: usize) -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "message": format!("the server has its maximum of {max_connections} connections open; retry later"),
        "type": "server_error",
        "param": null,
        "code": "too_many_connections",
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
