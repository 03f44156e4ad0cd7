//! An OpenAI-compatible HTTP API as a wasi:http component, written with spin-sdk.
//!
//! It imports `edge:slm/generator` and nothing but `wasi:*` besides, so it runs on any
//! wasi:http@0.2.0 host once composed with a generator.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`, `GET /health`.

pub mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "edge:slm/generator-client" });
}
// Only the wasm32 `handler` below calls into these; native builds (the unit tests) leave most
// of them unused.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod fields;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod logprobs;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod openai;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod reply;
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
mod tools;

/// The request parser, for the integration tests (tests/fuzz_request.rs).
pub use fields::FIELDS;
pub use openai::{chat_request, completion_request, ApiError, Request};

#[cfg(target_arch = "wasm32")]
mod handler {
    use spin_sdk::http::{IncomingRequest, Method, ResponseOutparam};
    use spin_sdk::http_component;

    use crate::{openai, reply, route, Route};

    #[http_component]
    async fn handle(req: IncomingRequest, out: ResponseOutparam) {
        let path = req.path_with_query().unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default().to_string();
        let is_post = matches!(req.method(), Method::Post);
        let method = if is_post {
            "POST"
        } else if matches!(req.method(), Method::Get) {
            "GET"
        } else {
            "OTHER"
        };
        let body = if is_post {
            match req.into_body().await {
                Ok(b) => b,
                Err(e) => {
                    return reply::send_error(
                        out,
                        openai::ApiError::invalid(
                            format!("could not read the request body: {e:?}"),
                            None,
                        ),
                    )
                    .await
                }
            }
        } else {
            Vec::new()
        };
        match route(method, &path) {
            Route::Chat => reply::chat(out, &body).await,
            Route::Completions => reply::completions(out, &body).await,
            Route::Models => reply::models(out).await,
            Route::Health => reply::health(out).await,
            Route::Error(e) => reply::send_error(out, e).await,
        }
    }
}

/// Which handler serves a request.
#[derive(Debug, PartialEq)]
pub enum Route {
    Chat,
    Completions,
    Models,
    Health,
    Error(openai::ApiError),
}

pub fn route(method: &str, path: &str) -> Route {
    let path = path.trim_end_matches('/');
    let (wanted, route) = match path {
        "/v1/chat/completions" => ("POST", Route::Chat),
        "/v1/completions" => ("POST", Route::Completions),
        "/v1/models" => ("GET", Route::Models),
        "/health" => ("GET", Route::Health),
        _ => return no_route(404, "not_found", format!("no route for {path}")),
    };
    if method != wanted {
        return no_route(
            405,
            "method_not_allowed",
            format!("{path} takes {wanted}, not {method}"),
        );
    }
    route
}

/// A request that matches no route: an `invalid_request_error` with this status and code.
fn no_route(status: u16, code: &'static str, message: String) -> Route {
    Route::Error(openai::ApiError {
        status,
        message,
        kind: "invalid_request_error",
        code: Some(code),
        param: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("POST", "/v1/chat/completions"), Route::Chat);
        assert_eq!(route("GET", "/health/"), Route::Health);
        assert!(matches!(route("GET", "/v1/chat/completions"), Route::Error(e) if e.status == 405));
        assert!(matches!(route("POST", "/nope"), Route::Error(e) if e.status == 404));
    }
}
