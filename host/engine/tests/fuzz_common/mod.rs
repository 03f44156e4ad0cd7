//! What the loader fuzz tests share (host/engine/tests/fuzz_load.rs, and slm-wasi-nn's through
//! `#[path]`): a seeded source of cases, the tiny model's bytes and where its weights lie in them,
//! byte-level corruptions, and a tally that runs each case catching the panics that escape it.
//!
//! No dependencies beyond std: slm-wasi-nn's tests include this file too.

#![allow(dead_code)] // each test crate uses a part

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Once;
use std::time::Instant;

/// splitmix64: a small, seeded, reproducible source of cases.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// The tiny model's layouts that the engine rewrites differently: Q4_1 (the default, packed
/// while decoding), int8 (`Cast * Mul` weights), 4-bit `MatMulNBits` that is not Q4_1.
pub const LAYOUTS: [&str; 3] = ["model.onnx", "model_int8.onnx", "model_q4.onnx"];

/// A file of the tiny test model (scripts/test builds it).
pub fn tiny_bytes(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/test-models/tiny")
        .join(file);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/test builds it)", path.display()))
}

/// Byte ranges of the weights' `raw_data` in an ONNX file (ModelProto.graph = 7,
/// GraphProto.initializer = 5, TensorProto.raw_data = 9): most of the file, and the least
/// interesting place to flip a byte.
pub fn raw_data_ranges(bytes: &[u8]) -> Vec<(usize, usize)> {
    fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*pos)?;
            *pos += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// The length-delimited fields of the message in `b[start..end]`: (field, payload range).
    fn fields(b: &[u8], start: usize, end: usize) -> Vec<(u64, usize, usize)> {
        let mut out = vec![];
        let mut pos = start;
        while pos < end {
            let Some(key) = varint(b, &mut pos) else {
                break;
            };
            let to = match key & 7 {
                0 => varint(b, &mut pos).map(|_| pos),
                1 => Some(pos + 8),
                2 => varint(b, &mut pos).and_then(|n| pos.checked_add(n as usize)),
                5 => Some(pos + 4),
                _ => None,
            };
            let Some(to) = to.filter(|&t| t <= end) else {
                break;
            };
            if key & 7 == 2 {
                out.push((key >> 3, pos, to));
            }
            pos = to;
        }
        out
    }
    let mut ranges = vec![];
    for (_, s, e) in fields(bytes, 0, bytes.len())
        .into_iter()
        .filter(|f| f.0 == 7)
    {
        for (_, s, e) in fields(bytes, s, e).into_iter().filter(|f| f.0 == 5) {
            ranges.extend(
                fields(bytes, s, e)
                    .into_iter()
                    .filter(|f| f.0 == 9)
                    .map(|f| (f.1, f.2)),
            );
        }
    }
    ranges
}

/// Where to cut a file of `len` bytes: the edges, anywhere, and often in its first 64 KiB (the
/// header and the graph's nodes).
pub fn cuts(rng: &mut Rng, len: usize, n: usize) -> Vec<usize> {
    let mut cuts = vec![0, 1, 2, 3, 8, 16, 64, 1024, len / 2, len - 2, len - 1];
    cuts.extend((0..n / 2).map(|_| rng.below(len)));
    cuts.extend((0..n / 2).map(|_| rng.below(len.min(64 << 10))));
    cuts
}

/// `bytes` with 1 to 3 bytes changed, mostly outside the weights' raw data (`raw`: the graph,
/// names, shapes, attributes); the edits as (offset, old, new).
pub fn flip(
    rng: &mut Rng,
    bytes: &[u8],
    raw: &[(usize, usize)],
) -> (Vec<u8>, Vec<(usize, u8, u8)>) {
    let mut out = bytes.to_vec();
    let mut edits = vec![];
    for _ in 0..1 + rng.below(3) {
        let anywhere = rng.chance(15);
        let p = loop {
            let p = rng.below(out.len());
            if anywhere || !raw.iter().any(|&(s, e)| s <= p && p < e) {
                break p;
            }
        };
        let old = out[p];
        out[p] = match rng.below(4) {
            0 => old ^ (1 << rng.below(8)),
            1 => rng.next() as u8,
            2 => *rng.pick(&[0x00, 0x7f, 0x80, 0xff]),
            _ => old.wrapping_add(1),
        };
        edits.push((p, old, out[p]));
    }
    (out, edits)
}

/// Random bytes, sometimes after a prefix that looks like the start of an ONNX file (or a GGUF).
pub fn garbage(rng: &mut Rng) -> Vec<u8> {
    let prefixes: [&[u8]; 5] = [
        b"",
        // ir_version 8, then a graph field.
        b"\x08\x08\x3a",
        // A graph holding a node (tag 1).
        b"\x3a\x40\x0a\x10",
        // A graph announcing 4 GiB, then an initializer.
        b"\x3a\xff\xff\xff\xff\x0f\x2a",
        b"GGUF\x03\x00\x00\x00",
    ];
    let mut bytes = rng.pick(&prefixes).to_vec();
    let n = *rng.pick(&[0, 1, 7, 64, 1000, 4096]);
    bytes.extend(rng.bytes(n));
    bytes
}

thread_local! {
    /// Set while this thread runs a case: its panics are recorded, not printed.
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    /// Where the last panic of a case happened (`file:line`).
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic hook that records where a case's panic happened (the payload alone does not say
/// whose code it was) and prints the others as usual.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(Cell::get) {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                PANIC_AT.with(|p| *p.borrow_mut() = at);
            } else {
                default(info);
            }
        }));
    });
}

/// Whether a panic at `file:line` was in this workspace's code (not in a dependency's).
pub fn ours(at: &str) -> bool {
    !at.contains("/.cargo/") && !at.contains("/rustc/") && !at.starts_with('/')
}

/// What a run of cases made of them.
#[derive(Default)]
pub struct Tally {
    pub cases: usize,
    pub ok: usize,
    pub errors: usize,
    /// Panics that escaped, each a line naming the case and where it panicked.
    pub panics: Vec<(String, String)>,
}

impl Tally {
    pub fn new() -> Tally {
        install_hook();
        Tally::default()
    }

    /// Runs one case (`f` says whether it succeeded), recording a panic that escapes it.
    pub fn run(&mut self, what: impl FnOnce() -> String, f: impl FnOnce() -> bool) {
        self.cases += 1;
        IN_CASE.with(|c| c.set(true));
        PANIC_AT.with(|p| p.borrow_mut().take());
        let r = catch_unwind(AssertUnwindSafe(f));
        IN_CASE.with(|c| c.set(false));
        match r {
            Ok(true) => self.ok += 1,
            Ok(false) => self.errors += 1,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(not a string)".into());
                let at = PANIC_AT
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "(another thread)".into());
                self.panics
                    .push((at.clone(), format!("{}: panicked at {at}: {msg}", what())));
            }
        }
    }

    /// Prints the counts (`cargo test -- --nocapture`) and fails on any panic `fatal` says is
    /// one.
    pub fn check(self, test: &str, started: Instant, fatal: impl Fn(&str) -> bool) {
        eprintln!(
            "{test}: {} cases, {} ok, {} errors, {} panics, {:.1} s",
            self.cases,
            self.ok,
            self.errors,
            self.panics.len(),
            started.elapsed().as_secs_f64()
        );
        for (_, p) in &self.panics {
            eprintln!("  {p}");
        }
        let failed: Vec<&str> = self
            .panics
            .iter()
            .filter(|(at, _)| fatal(at))
            .map(|(_, p)| p.as_str())
            .collect();
        assert!(
            failed.is_empty(),
            "{test}: {} of {} cases panicked:\n{}",
            failed.len(),
            self.cases,
            failed.join("\n")
        );
    }
}
