//! API keys: `Authorization: Bearer KEY` on every route but `/health`.
//!
//! Keys are kept and compared as SHA-256 digests, every key every time, so neither the time a
//! check takes nor a log line tells anything about a key.

use anyhow::{bail, Result};
use sha2::{Digest, Sha256};

type KeyDigest = [u8; 32];

/// The keys a server accepts; none means no authentication.
pub struct ApiKeys {
    digests: Vec<KeyDigest>,
    /// `--public-metrics`: `/metrics` needs no key.
    public_metrics: bool,
}

impl ApiKeys {
    pub fn new(keys: Vec<String>) -> Result<ApiKeys> {
        if keys.iter().any(|k| k.trim().is_empty()) {
            bail!("an API key is empty");
        }
        if let Some(k) = keys.iter().find(|k| k.chars().any(|c| c.is_whitespace())) {
            bail!(
                "an API key contains whitespace ({} characters long)",
                k.len()
            );
        }
        Ok(ApiKeys {
            digests: keys.iter().map(|k| digest(k.as_bytes())).collect(),
            public_metrics: false,
        })
    }

    /// Whether any key is required.
    pub fn required(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Serve `/metrics` without a key (scrapers that cannot send one).
    pub fn with_public_metrics(mut self, public: bool) -> Self {
        self.public_metrics = public;
        self
    }

    /// Whether a request to `route` (a metrics route label) must carry a key: every route but
    /// `/health` (load balancers' checks) and, with `--public-metrics`, `/metrics`.
    pub fn needed_for(&self, route: &str) -> bool {
        self.required() && route != "/health" && !(self.public_metrics && route == "/metrics")
    }

    /// Whether an `Authorization` header value carries an accepted key.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(key) = authorization.and_then(bearer_token) else {
            return false;
        };
        let presented = digest(key);
        // No early exit: every key is compared, every byte of each.
        self.digests
            .iter()
            .fold(false, |any, d| any | digests_equal(d, &presented))
    }
}

fn digest(bytes: &[u8]) -> KeyDigest {
    Sha256::digest(bytes).into()
}

fn digests_equal(a: &KeyDigest, b: &KeyDigest) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 7235).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let keys = ApiKeys::new(vec!["sk-one".into(), "sk-two".into()]).unwrap();
        assert!(keys.required());
        assert!(keys.allows(Some(b"Bearer sk-one")));
        assert!(keys.allows(Some(b"bearer  sk-two ")));
        assert!(!keys.allows(Some(b"Bearer sk-on")));
        assert!(!keys.allows(Some(b"Bearer sk-one1")));
        assert!(!keys.allows(Some(b"Basic sk-one")));
        assert!(!keys.allows(Some(b"sk-one")));
        assert!(!keys.allows(None));
        assert!(!ApiKeys::new(vec![]).unwrap().required());
        assert!(ApiKeys::new(vec![" ".into()]).is_err());
        assert!(ApiKeys::new(vec!["a b".into()]).is_err());
    }
}
