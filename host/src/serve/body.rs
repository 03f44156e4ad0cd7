//! Reading a request body, whole, before any instance exists: a client that sends slowly, or
//! too much, holds a connection but never an instance or a generation slot.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::StatusCode;

use super::respond::ApiError;

/// The body of `req`, at most `limit` bytes, within `timeout`.
pub async fn read(
    req: hyper::Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<hyper::Request<Bytes>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than this server's limit of {limit} bytes"),
        )
        .code("request_too_large")
    };
    // Refused before reading, when the client says how much is coming.
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let collected = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    let body = match collected {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("cannot read the request body: {e}"),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
            )
            .code("request_timeout"))
        }
    };
    Ok(hyper::Request::from_parts(parts, body))
}

/// The model a generation request names (`model` of a JSON object body), `Some(None)` when it
/// names none; None when the body is not such an object (the component refuses it, without
/// generating).
pub fn requested_model(body: &[u8]) -> Option<Option<String>> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(default)]
        model: Option<String>,
    }
    serde_json::from_slice::<Peek>(body).ok().map(|p| p.model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_of_a_request() {
        let m = |b: &str| requested_model(b.as_bytes());
        assert_eq!(
            m(r#"{"model": "a", "messages": []}"#),
            Some(Some("a".into()))
        );
        assert_eq!(m(r#"{"messages": []}"#), Some(None));
        assert_eq!(m(r#"{"model": null}"#), Some(None));
        assert_eq!(m(r#"{"model": 3}"#), None);
        assert_eq!(m("[1]"), None);
        assert_eq!(m("{"), None);
    }
}
