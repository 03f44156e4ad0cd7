//! How failures of the generator component read on the command line: a trap, and each guest
//! error as one message that names the flag to change or the way out.

use anyhow::anyhow;

use crate::completion::Failure;
use crate::runtime::{one_line, GuestError};

/// The installed models for a message: their names, or "none".
pub fn available(models: &[String]) -> String {
    if models.is_empty() {
        "none".to_string()
    } else {
        models.join(", ")
    }
}

/// The component trapped (a bug or a resource limit in the guest).
pub fn trap(e: wasmtime::Error) -> anyhow::Error {
    anyhow!("the generator component failed: {}", one_line(&e))
}

/// An error the generator returned; `models` are the installed ones (named when one is missing).
pub fn guest(e: GuestError, models: &[String]) -> anyhow::Error {
    match e {
        GuestError::ModelNotFound(m) => anyhow!(
            "model not found: {m} (available: {}; use --model NAME or --models DIR)",
            available(models)
        ),
        GuestError::InvalidRequest(m) => anyhow!("{m}"),
        GuestError::InvalidOption(o) => match flag(&o.name) {
            Some(flag) => anyhow!("{} ({flag})", o.message),
            None => anyhow!("{}", o.message),
        },
        GuestError::ContextOverflow(c) => anyhow!(
            "prompt has {} tokens, context is {} (shorten the prompt)",
            c.prompt_tokens,
            c.context_length
        ),
        GuestError::ModelError(m) => anyhow!("model error: {m}"),
        GuestError::BackendFailure(m) => anyhow!("backend failure: {m}"),
    }
}

/// A failed completion (see [`crate::completion`]).
pub fn failure(f: Failure, models: &[String]) -> anyhow::Error {
    match f {
        Failure::StartTrap(e) | Failure::Trap(e) => trap(e),
        Failure::Guest(e) => guest(e, models),
        Failure::Sink(e) => e,
    }
}

/// The command-line flag that sets a generator option (`name` as in the WIT `options` /
/// `sampling` records).
fn flag(name: &str) -> Option<&'static str> {
    Some(match name {
        "temperature" => "--temperature",
        "top-p" => "--top-p",
        "min-p" => "--min-p",
        "repetition-penalty" => "--repeat-penalty",
        "stop" => "--stop",
        "tools" => "--tools",
        "tool-choice" => "--tool-choice",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::edge::slm::types::InvalidOption;

    #[test]
    fn guest_messages_name_the_flag_and_the_models() {
        let msg = |e| guest(e, &["a".to_string(), "b".to_string()]).to_string();
        let option = |name: &str, message: &str| {
            GuestError::InvalidOption(InvalidOption {
                name: name.into(),
                message: message.into(),
            })
        };
        assert_eq!(
            msg(option("top-p", "top-p must be in (0, 1]")),
            "top-p must be in (0, 1] (--top-p)"
        );
        assert_eq!(
            msg(option(
                "repetition-penalty",
                "repetition-penalty must be > 0"
            )),
            "repetition-penalty must be > 0 (--repeat-penalty)"
        );
        assert_eq!(msg(option("other", "an option")), "an option");
        assert_eq!(
            msg(GuestError::InvalidRequest("something else".into())),
            "something else"
        );
        assert_eq!(
            msg(GuestError::ModelNotFound("x".into())),
            "model not found: x (available: a, b; use --model NAME or --models DIR)"
        );
        assert_eq!(available(&[]), "none");
    }
}
