//! The edge:slm generator component: exports `edge:slm/generator`, imports wasi:nn.
//!
//! Model files come from `/models/<name>/` in the WASI filesystem; inference goes through
//! wasi:nn (`load-by-name(<name>)`, one execution context per completion, the KV cache kept
//! by the host). Everything but `nn_session` and `component` is pure logic that tests natively.

mod bpe;
pub mod chat;
pub mod constraint;
pub mod detok;
pub mod error;
pub mod generate;
pub mod logprobs;
pub mod model;
pub mod rng;
pub mod sampler;
pub mod stop;
pub mod template;
pub mod tokenizer;
mod tokenizer_file;
pub mod tools;

#[cfg(target_arch = "wasm32")]
mod bindings {
    wit_bindgen::generate!({ path: "../../wit", world: "edge:slm/generator-build", generate_all });
}
#[cfg(target_arch = "wasm32")]
mod component;
#[cfg(target_arch = "wasm32")]
mod nn_session;
