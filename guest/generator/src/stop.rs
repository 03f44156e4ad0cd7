//! Stop strings: text is released only once it cannot be the start of a stop string, and
//! generation ends before the first stop string found.

use crate::error::{Error, Result};

pub const MAX_STOP_STRINGS: usize = 16;

pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not released yet: a suffix that could still begin a stop string.
    pending: String,
    stopped: bool,
}

/// What `push` found.
#[derive(Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Text that is safe to emit now.
    pub text: String,
    /// A stop string was found; `text` ends right before it, and nothing more will be released.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Result<Self> {
        if stops.len() > MAX_STOP_STRINGS {
            return Err(Error::invalid_option(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                    stops.len()
                ),
            ));
        }
        if stops.iter().any(|s| s.is_empty()) {
            return Err(Error::invalid_option(
                "stop",
                "stop strings must not be empty",
            ));
        }
        Ok(StopMatcher {
            stops,
            pending: String::new(),
            stopped: false,
        })
    }

    /// Add newly decoded text; returns what can be released.
    pub fn push(&mut self, text: &str) -> Pushed {
        let text = if self.stopped {
            String::new()
        } else {
            self.pending.push_str(text);
            let at = self.release_len();
            let rest = self.pending.split_off(at);
            std::mem::replace(&mut self.pending, rest)
        };
        Pushed {
            text,
            stopped: self.stopped,
        }
    }

    /// How much of `pending` (in bytes) can be released. A stop string found in it ends the
    /// output: it and all after it are dropped, and `stopped` is set.
    fn release_len(&mut self) -> usize {
        if self.stops.is_empty() {
            return self.pending.len();
        }
        // Earliest occurrence of any stop string. Text released earlier could not start one,
        // so any occurrence lies inside `pending`.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            self.pending.truncate(at);
            self.stopped = true;
            return at;
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let suffix = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .unwrap_or(self.pending.len())
    }

    /// Generation ended without a stop string: release what was held back.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut sm = m(stops);
        let mut out = Vec::new();
        for p in pieces {
            let r = sm.push(p);
            out.push(r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push(sm.finish());
        (out, false)
    }

    #[test]
    fn validation() {
        assert!(StopMatcher::new(vec!["".into()]).is_err());
        assert!(StopMatcher::new(vec!["x".into(); 17]).is_err());
        assert!(StopMatcher::new(vec!["x".into(); 16]).is_ok());
    }

    #[test]
    fn no_stops_passes_through() {
        let (out, stopped) = run(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b", ""]);
        assert!(!stopped);
    }

    #[test]
    fn stop_across_pieces_is_not_emitted() {
        let (out, stopped) = run(&["END"], &["hello E", "N", "D world"]);
        assert_eq!(out, ["hello ", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn false_start_is_released() {
        let (out, stopped) = run(&["END"], &["an E", "NT", "ry"]);
        assert_eq!(out, ["an ", "ENT", "ry", ""]);
        assert!(!stopped);
    }

    #[test]
    fn held_text_released_at_finish() {
        let (out, _) = run(&["END"], &["abc EN"]);
        assert_eq!(out, ["abc ", "EN"]);
    }

    #[test]
    fn earliest_of_several_stops() {
        let (out, stopped) = run(&["world", "lo w"], &["hello world"]);
        assert_eq!(out, ["hel"]);
        assert!(stopped);
    }

    #[test]
    fn char_by_char_stream() {
        let stops = ["\n\nUser:", "###"];
        let text = "Sure.\n\nHere # is ## a list\n\nUs and\n\nUser: bye";
        let mut sm = m(&stops);
        let mut all = String::new();
        for ch in text.chars() {
            let r = sm.push(&ch.to_string());
            all.push_str(&r.text);
            if r.stopped {
                break;
            }
        }
        assert_eq!(all, "Sure.\n\nHere # is ## a list\n\nUs and");
    }

    #[test]
    fn multibyte_stop() {
        let (out, stopped) = run(&["é!"], &["café", "!x"]);
        assert_eq!(out, ["caf", ""]);
        assert!(stopped);
    }
}
