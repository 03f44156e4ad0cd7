//! Incremental detokenization: turn a growing list of token ids into text pieces that are
//! whole UTF-8 characters, without special tokens.
//!
//! Decoding token by token is wrong for byte-level and sentencepiece tokenizers (a character
//! may span tokens; leading spaces depend on context), so the running window is decoded: the
//! text of `ids[prefix..read]` is known to be emitted, and the text of `ids[prefix..]` beyond
//! it is new. A trailing U+FFFD means the last token ended inside a character: hold it back.

use crate::error::Result;

/// Something that decodes token ids to text (skipping special tokens).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// End of the tokens whose text has been emitted.
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token; returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &impl Decode, id: u32) -> Result<String> {
        self.ids.push(id);
        self.emit(tok, false)
    }

    /// No more tokens: return whatever text is still held back.
    pub fn finish(&mut self, tok: &impl Decode) -> Result<String> {
        self.emit(tok, true)
    }

    fn emit(&mut self, tok: &impl Decode, last: bool) -> Result<String> {
        if self.read >= self.ids.len() {
            return Ok(String::new());
        }
        let prefix_text = tok.decode(&self.ids[self.prefix..self.read])?;
        let new_text = tok.decode(&self.ids[self.prefix..])?;
        if new_text.len() <= prefix_text.len() || (!last && new_text.ends_with('\u{FFFD}')) {
            // Nothing new yet (special token, or an incomplete character).
            if last {
                self.read = self.ids.len();
            }
            return Ok(String::new());
        }
        let mut cut = prefix_text.len();
        while !new_text.is_char_boundary(cut) {
            cut += 1;
        }
        let piece = new_text[cut..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level toy tokenizer: each id is one byte; 1000+ are special tokens.
    struct Bytes;
    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn stream(ids: &[u32]) -> Vec<String> {
        let mut d = Detokenizer::new();
        let mut out: Vec<String> = ids.iter().map(|&i| d.push(&Bytes, i).unwrap()).collect();
        out.push(d.finish(&Bytes).unwrap());
        out
    }

    #[test]
    fn ascii_one_piece_per_token() {
        assert_eq!(stream(&[104, 105]), ["h", "i", ""]);
    }

    #[test]
    fn multibyte_held_until_complete() {
        // "é" = C3 A9, "€" = E2 82 AC
        let out = stream(&[0x61, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0x62]);
        assert_eq!(out, ["a", "", "é", "", "", "€", "b", ""]);
        for p in &out {
            assert!(!p.contains('\u{FFFD}'));
        }
    }

    #[test]
    fn special_tokens_are_not_text() {
        assert_eq!(stream(&[104, 1000, 105]), ["h", "", "i", ""]);
    }

    #[test]
    fn truncated_character_flushed_at_finish() {
        let out = stream(&[0x61, 0xE2, 0x82]);
        assert_eq!(out.concat(), "a\u{FFFD}");
        assert_eq!(out[1], "");
        assert_eq!(out[2], "");
    }

    /// A sentencepiece-like decoder that strips the leading space of the decoded text.
    struct Spm;
    impl Decode for Spm {
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let s: String = ids
                .iter()
                .map(|&i| {
                    if i == 0 {
                        " a".to_string()
                    } else {
                        " b".to_string()
                    }
                })
                .collect();
            Ok(s.strip_prefix(' ').unwrap_or(&s).to_string())
        }
    }

    #[test]
    fn context_dependent_leading_space() {
        let mut d = Detokenizer::new();
        let out: Vec<String> = [0, 1, 0]
            .iter()
            .map(|&i| d.push(&Spm, i).unwrap())
            .collect();
        assert_eq!(out.concat(), "a b a");
    }
}
