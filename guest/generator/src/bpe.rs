//! A BPE model that tokenizes exactly as `tokenizers`' own `BPE` does, held in a few flat arrays.
//!
//! The library's BPE keeps its vocabulary twice as hash maps of `String`s and its merges as a
//! hash map built from a `Vec<(String, String)>`: for Gemma 3's 262k tokens and 513k merges that is
//! 60 MB once built and a 98 MB high-water mark while building, and a wasm32 linear memory never
//! gives back what it grew to. Here the tokens' text is one string, the text-to-id index a table
//! of ids, and the merges a table of ids sorted by left token: 14 MB, built token by token and
//! merge by merge as `tokenizer_file.rs` reads the file (the generator's memory high-water mark
//! for Gemma 3: 98 -> 56 MB). The rest of the pipeline (normalizer, pre-tokenizer, added tokens,
//! decoder) stays the library's: this is a `tokenizers::Model`. It keeps no cache of words as the
//! library's does: 8k tokens encode in 10 ms natively against the library's 5.6 ms.
//!
//! What it does not take (dropout, subword prefixes and suffixes) stays with the library's BPE;
//! the reader sends such files there.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hashbrown::HashTable;
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::{Model, Token};

/// An id no token has.
const NO_TOKEN: u32 = u32::MAX;

/// The model. Cloning shares the tables.
#[derive(Clone)]
pub struct Bpe {
    tables: Arc<Tables>,
    options: Options,
}

/// The BPE options the library's files carry (besides dropout, prefix and suffix, which this
/// model refuses).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `None` and `Some(0.0)` (the only dropout taken) both mean no dropout; kept to be written
    /// back as read.
    pub dropout: Option<f32>,
    pub unk_token: Option<String>,
    pub fuse_unk: bool,
    pub byte_fallback: bool,
    pub ignore_merges: bool,
}

struct Tables {
    vocab: Vocab,
    merges: Merges,
    /// `<0xHH>`'s id for each byte, for byte fallback.
    byte_tokens: Box<[u32; 256]>,
}

/// Token text <-> id.
struct Vocab {
    /// Every token's text, one after another.
    text: String,
    /// By id: where its text lies in `text`; `(NO_TOKEN, 0)` for an id no token has.
    spans: Vec<(u32, u32)>,
    /// Ids, found by their text's hash.
    index: HashTable<u32>,
    hasher: foldhash::fast::FixedState,
}

impl Default for Vocab {
    fn default() -> Vocab {
        Vocab {
            text: String::new(),
            spans: Vec::new(),
            index: HashTable::new(),
            hasher: foldhash::fast::FixedState::with_seed(0x5eed),
        }
    }
}

impl Vocab {
    fn hash(&self, token: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(token)
    }

    fn text_of(&self, id: u32) -> Option<&str> {
        let &(start, len) = self.spans.get(id as usize)?;
        (start != NO_TOKEN).then(|| &self.text[start as usize..(start + len) as usize])
    }

    fn id(&self, token: &str) -> Option<u32> {
        let hash = self.hash(token);
        self.index
            .find(hash, |&id| self.text_of(id) == Some(token))
            .copied()
    }

    /// Adds `token` as `id`. A token or an id read twice is refused: the library would keep
    /// both spellings of an id, and the reader leaves such files to it.
    fn insert(&mut self, token: &str, id: u32) -> Result<(), String> {
        if id == NO_TOKEN {
            return Err(format!("token id {id} is out of range"));
        }
        let start = u32::try_from(self.text.len())
            .ok()
            .filter(|s| s.checked_add(token.len() as u32).is_some())
            .ok_or("vocabulary text over 4 GB")?;
        if self.id(token).is_some() || self.text_of(id).is_some() {
            return Err(format!("token {token:?} or id {id} read twice"));
        }
        if self.spans.len() <= id as usize {
            self.spans.resize(id as usize + 1, (NO_TOKEN, 0));
        }
        self.text.push_str(token);
        self.spans[id as usize] = (start, token.len() as u32);
        let hash = self.hash(token);
        let Vocab {
            index,
            spans,
            text,
            hasher,
        } = self;
        let rehash = |&i: &u32| {
            use std::hash::BuildHasher;
            let (s, l) = spans[i as usize];
            hasher.hash_one(&text[s as usize..(s + l) as usize])
        };
        index.insert_unique(hash, id, rehash);
        Ok(())
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// Every token, by id.
    fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        (0..self.spans.len() as u32).filter_map(|id| Some((id, self.text_of(id)?)))
    }
}

/// The merges, by left token: `entries[starts[a]..starts[a + 1]]` are `a`'s, sorted by right
/// token.
struct Merges {
    starts: Vec<u32>,
    entries: Vec<Merge>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Merge {
    right: u32,
    rank: u32,
    new_id: u32,
}

impl Merges {
    /// `(rank, new_id)` of the merge of `left` and `right`.
    fn get(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        let (from, to) = (
            *self.starts.get(left as usize)?,
            *self.starts.get(left as usize + 1)?,
        );
        let list = &self.entries[from as usize..to as usize];
        let k = list.binary_search_by_key(&right, |m| m.right).ok()?;
        Some((list[k].rank, list[k].new_id))
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Builds a [`Bpe`]: tokens, the end of the vocabulary, merges in rank order.
#[derive(Default)]
pub struct Builder {
    vocab: Vocab,
    vocab_ended: bool,
    /// (left, right, rank, new id), as read.
    merges: Vec<(u32, u32, u32, u32)>,
    scratch: String,
}

impl Builder {
    pub fn token(&mut self, token: &str, id: u32) -> Result<(), String> {
        if self.vocab_ended {
            return Err("a token after the vocabulary's end".into());
        }
        self.vocab.insert(token, id)
    }

    pub fn vocab_ended(&self) -> bool {
        self.vocab_ended
    }

    /// The vocabulary is complete: merges may follow.
    pub fn end_vocab(&mut self) {
        self.vocab_ended = true;
    }

    /// The next merge: `a` and `b`, both tokens, into the token `ab`.
    pub fn merge(&mut self, a: &str, b: &str) -> Result<(), String> {
        if !self.vocab_ended {
            return Err("a merge before the vocabulary's end".into());
        }
        let id = |t: &str| {
            self.vocab
                .id(t)
                .ok_or_else(|| format!("merge token {t:?} is not in the vocabulary"))
        };
        let (left, right) = (id(a)?, id(b)?);
        self.scratch.clear();
        self.scratch.push_str(a);
        self.scratch.push_str(b);
        let new_id = id(&self.scratch)?;
        let rank = u32::try_from(self.merges.len()).map_err(|_| "too many merges")?;
        self.merges.push((left, right, rank, new_id));
        Ok(())
    }

    /// The model; call [`Builder::end_vocab`] first.
    pub fn build(self, options: Options) -> Bpe {
        let Builder {
            mut vocab,
            mut merges,
            ..
        } = self;
        vocab.text.shrink_to_fit();
        vocab.spans.shrink_to_fit();
        // A pair listed twice keeps its last rank, as the library's map does.
        merges.sort_unstable();
        merges.dedup_by(|later, earlier| {
            let same = (later.0, later.1) == (earlier.0, earlier.1);
            if same {
                *earlier = *later;
            }
            same
        });
        let mut starts = vec![0u32; vocab.spans.len() + 1];
        for &(left, ..) in &merges {
            starts[left as usize + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let entries: Vec<Merge> = merges
            .iter()
            .map(|&(_, right, rank, new_id)| Merge {
                right,
                rank,
                new_id,
            })
            .collect();
        drop(merges);
        let mut byte_tokens = Box::new([NO_TOKEN; 256]);
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.id(&format!("<{b:#04X}>")).unwrap_or(NO_TOKEN);
        }
        Bpe {
            tables: Arc::new(Tables {
                vocab,
                merges: Merges { starts, entries },
                byte_tokens,
            }),
            options,
        }
    }
}

/// One symbol of a word being merged, as the library's `Word` holds it.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: isize,
    next: isize,
    /// Bytes of the word it covers; 0 once merged into its left neighbour.
    len: usize,
}

impl Bpe {
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The symbols of `word` (one per character, or per byte by byte fallback, or unknown),
    /// merged lowest rank first, leftmost first among equals: the library's `merge_word`.
    fn merge_word(&self, word: &str) -> tokenizers::Result<Vec<Symbol>> {
        let t = &*self.tables;
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let push = |symbols: &mut Vec<Symbol>, id: u32, len: usize| {
            let at = symbols.len() as isize;
            if let Some(last) = symbols.last_mut() {
                last.next = at;
            }
            symbols.push(Symbol {
                id,
                prev: at - 1,
                next: -1,
                len,
            });
        };
        let mut unk: Option<(u32, usize)> = None;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(id) = t.vocab.id(s) {
                if let Some((unk_id, unk_len)) = unk.take() {
                    push(&mut symbols, unk_id, unk_len);
                }
                push(&mut symbols, id, s.len());
                continue;
            }
            if self.options.byte_fallback {
                let bytes: Option<Vec<u32>> = s
                    .bytes()
                    .map(|b| Some(t.byte_tokens[b as usize]).filter(|&id| id != NO_TOKEN))
                    .collect();
                if let Some(bytes) = bytes {
                    for id in bytes {
                        push(&mut symbols, id, 1);
                    }
                    continue;
                }
            }
            if let Some(unk_token) = &self.options.unk_token {
                let unk_id = || {
                    t.vocab
                        .id(unk_token)
                        .ok_or_else(|| format!("unk token {unk_token:?} is not in the vocabulary"))
                };
                unk = match unk {
                    Some((unk_id, unk_len)) if self.options.fuse_unk => {
                        Some((unk_id, unk_len + s.len()))
                    }
                    Some((unk_id_before, unk_len)) => {
                        push(&mut symbols, unk_id_before, unk_len);
                        Some((unk_id()?, s.len()))
                    }
                    None => Some((unk_id()?, s.len())),
                };
            }
        }
        if let Some((unk_id, unk_len)) = unk {
            push(&mut symbols, unk_id, unk_len);
        }
        self.merge_all(&mut symbols);
        symbols.retain(|s| s.len != 0);
        Ok(symbols)
    }

    /// The library's `Word::merge_all` without dropout: a queue of (rank, position), lowest
    /// first; an entry whose pair has changed since it was queued is skipped.
    fn merge_all(&self, symbols: &mut [Symbol]) {
        let merges = &self.tables.merges;
        let mut queue: BinaryHeap<Reverse<(u32, usize, u32)>> = symbols
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| {
                let (rank, new_id) = merges.get(w[0].id, w[1].id)?;
                Some(Reverse((rank, pos, new_id)))
            })
            .collect();
        while let Some(Reverse((_, pos, new_id))) = queue.pop() {
            if symbols[pos].len == 0 || symbols[pos].next == -1 {
                continue;
            }
            let next = symbols[pos].next as usize;
            let right = symbols[next];
            if merges.get(symbols[pos].id, right.id).map(|m| m.1) != Some(new_id) {
                continue;
            }
            symbols[pos].id = new_id;
            symbols[pos].len += right.len;
            symbols[pos].next = right.next;
            symbols[next].len = 0;
            if right.next > -1 && (right.next as usize) < symbols.len() {
                symbols[right.next as usize].prev = pos as isize;
            }
            let current = symbols[pos];
            if current.prev >= 0 {
                let prev = current.prev as usize;
                if let Some((rank, new_id)) = merges.get(symbols[prev].id, current.id) {
                    queue.push(Reverse((rank, prev, new_id)));
                }
            }
            let after = current.next as usize;
            if current.next >= 0 && after < symbols.len() {
                if let Some((rank, new_id)) = merges.get(current.id, symbols[after].id) {
                    queue.push(Reverse((rank, pos, new_id)));
                }
            }
        }
    }

    fn text(&self, id: u32) -> &str {
        self.tables.vocab.text_of(id).unwrap_or_default()
    }
}

impl Model for Bpe {
    type Trainer = BpeTrainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<Token>> {
        if sequence.is_empty() {
            return Ok(vec![]);
        }
        if self.options.ignore_merges {
            if let Some(id) = self.token_to_id(sequence) {
                return Ok(vec![Token::new(
                    id,
                    sequence.to_string(),
                    (0, sequence.len()),
                )]);
            }
        }
        let mut at = 0;
        Ok(self
            .merge_word(sequence)?
            .into_iter()
            .map(|s| {
                let offsets = (at, at + s.len);
                at += s.len;
                Token::new(s.id, self.text(s.id).to_string(), offsets)
            })
            .collect())
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tables.vocab.id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.tables.vocab.text_of(id).map(str::to_string)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        let vocab = &self.tables.vocab;
        vocab.iter().map(|(id, t)| (t.to_string(), id)).collect()
    }

    fn get_vocab_size(&self) -> usize {
        self.tables.vocab.len()
    }

    fn save(&self, _folder: &Path, _prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        Err("saving a BPE model as vocab.json and merges.txt is not supported here".into())
    }

    fn get_trainer(&self) -> BpeTrainer {
        BpeTrainer::default()
    }
}

/// Written as the library writes its BPE: the same fields, the vocabulary by id, the merges by
/// rank as pairs.
impl Serialize for Bpe {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let o = &self.options;
        let mut model = serializer.serialize_struct("BPE", 10)?;
        model.serialize_field("type", "BPE")?;
        model.serialize_field("dropout", &o.dropout)?;
        model.serialize_field("unk_token", &o.unk_token)?;
        model.serialize_field("continuing_subword_prefix", &None::<String>)?;
        model.serialize_field("end_of_word_suffix", &None::<String>)?;
        model.serialize_field("fuse_unk", &o.fuse_unk)?;
        model.serialize_field("byte_fallback", &o.byte_fallback)?;
        model.serialize_field("ignore_merges", &o.ignore_merges)?;
        model.serialize_field("vocab", &VocabById(&self.tables.vocab))?;
        let merges = &self.tables.merges;
        let mut by_rank: Vec<(u32, u32, u32)> = Vec::with_capacity(merges.len());
        for left in 0..merges.starts.len().saturating_sub(1) {
            let (from, to) = (merges.starts[left], merges.starts[left + 1]);
            for m in &merges.entries[from as usize..to as usize] {
                by_rank.push((m.rank, left as u32, m.right));
            }
        }
        by_rank.sort_unstable();
        let pairs: Vec<(&str, &str)> = by_rank
            .iter()
            .map(|&(_, a, b)| (self.text(a), self.text(b)))
            .collect();
        model.serialize_field("merges", &pairs)?;
        model.end()
    }
}

struct VocabById<'a>(&'a Vocab);

impl Serialize for VocabById<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, token) in self.0.iter() {
            map.serialize_entry(token, &id)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::bpe::BPE;

    /// A random vocabulary over a few characters, with every split of each longer token as a
    /// merge (as a SentencePiece vocabulary rebuilt as BPE has them), in random rank order,
    /// some pairs twice.
    fn random_model(seed: u64, byte_fallback: bool) -> (Builder, BPE) {
        let mut state = seed;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let chars = ["a", "b", "c", "é", "▁"];
        let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        tokens.push("<unk>".into());
        if byte_fallback {
            tokens.extend((0..=255u8).map(|b| format!("<{b:#04X}>")));
        }
        while tokens.len() < 300 {
            let len = 2 + next(4) as usize;
            let t: String = (0..len).map(|_| chars[next(5) as usize]).collect();
            if !tokens.contains(&t) {
                tokens.push(t);
            }
        }
        let mut merges = vec![];
        for t in &tokens {
            if t.starts_with('<') {
                continue;
            }
            let ends: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
            for k in ends {
                let (a, b) = t.split_at(k);
                if tokens.iter().any(|x| x == a) && tokens.iter().any(|x| x == b) {
                    merges.push((a.to_string(), b.to_string()));
                }
            }
        }
        for i in (1..merges.len()).rev() {
            merges.swap(i, next(i as u64 + 1) as usize);
        }
        let dup = merges[3].clone();
        merges.push(dup);

        let mut ours = Builder::default();
        for (id, t) in tokens.iter().enumerate() {
            ours.token(t, id as u32).unwrap();
        }
        ours.end_vocab();
        for (a, b) in &merges {
            ours.merge(a, b).unwrap();
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let theirs = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token("<unk>".into())
            .fuse_unk(true)
            .byte_fallback(byte_fallback)
            .build()
            .unwrap();
        (ours, theirs)
    }

    fn random_text(seed: u64, len: usize) -> String {
        let pool = ['a', 'b', 'c', 'é', '▁', 'x', '日'];
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                pool[((state >> 33) % pool.len() as u64) as usize]
            })
            .collect()
    }

    #[test]
    fn tokenizes_as_the_library_bpe() {
        for (seed, byte_fallback) in [(1, false), (2, true), (3, true), (4, false)] {
            let (ours, theirs) = random_model(seed, byte_fallback);
            let ours = ours.build(Options {
                unk_token: Some("<unk>".into()),
                fuse_unk: true,
                byte_fallback,
                ..Options::default()
            });
            for k in 0..300 {
                let text = random_text(seed * 1000 + k, 1 + k as usize % 40);
                let ids = |m: &dyn Fn(&str) -> tokenizers::Result<Vec<Token>>| {
                    m(&text)
                        .unwrap()
                        .into_iter()
                        .map(|t| (t.id, t.value, t.offsets))
                        .collect::<Vec<_>>()
                };
                assert_eq!(
                    ids(&|s| ours.tokenize(s)),
                    ids(&|s| theirs.tokenize(s)),
                    "{text:?}"
                );
            }
            assert_eq!(ours.get_vocab(), theirs.get_vocab());
            assert_eq!(ours.get_vocab_size(), theirs.get_vocab_size());
            assert_eq!(
                serde_json::to_value(&ours).unwrap(),
                serde_json::to_value(&theirs).unwrap()
            );
        }
    }

    #[test]
    fn unknown_characters_fuse_or_not_as_asked() {
        for fuse_unk in [false, true] {
            let mut b = Builder::default();
            for (id, t) in ["<unk>", "a", "b", "ab"].iter().enumerate() {
                b.token(t, id as u32).unwrap();
            }
            b.end_vocab();
            b.merge("a", "b").unwrap();
            let ours = b.build(Options {
                unk_token: Some("<unk>".into()),
                fuse_unk,
                ..Options::default()
            });
            let ids: Vec<u32> = ours
                .tokenize("xyab")
                .unwrap()
                .iter()
                .map(|t| t.id)
                .collect();
            assert_eq!(ids, if fuse_unk { vec![0, 3] } else { vec![0, 0, 3] });
        }
    }

    #[test]
    fn a_merge_outside_the_vocabulary_is_an_error() {
        let mut b = Builder::default();
        b.token("a", 0).unwrap();
        b.token("b", 1).unwrap();
        b.end_vocab();
        assert!(b.merge("a", "b").unwrap_err().contains("\"ab\""));
        assert!(b.merge("a", "c").unwrap_err().contains("\"c\""));
    }

    #[test]
    fn merges_come_after_the_vocabulary() {
        let mut b = Builder::default();
        b.token("a", 0).unwrap();
        assert!(b.merge("a", "a").is_err());
        b.end_vocab();
        assert!(b.token("b", 1).is_err());
    }

    #[test]
    fn a_token_or_an_id_read_twice_is_refused() {
        let mut b = Builder::default();
        b.token("a", 0).unwrap();
        b.token("b", 1).unwrap();
        assert!(b.token("a", 2).is_err());
        assert!(b.token("c", 1).is_err());
        let m = b.build(Options::default());
        assert_eq!(m.token_to_id("a"), Some(0));
        assert_eq!(m.get_vocab_size(), 2);
    }
}
