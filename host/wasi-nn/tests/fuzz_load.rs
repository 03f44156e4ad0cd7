//! Fuzzing wasi:nn `graph.load` (issue 16, "Fuzzing"): the bytes come from a guest, so whatever
//! they are (the tiny model cut short or with bytes flipped, random garbage, graphs that make
//! tract's ONNX front end panic) `load_bytes` returns a model or an invalid-argument error, and
//! no panic escapes it. (slm-engine's tests/fuzz_load.rs mutates graphs node by node; this file
//! checks the layer that guests reach.)
//!
//! Deterministic: cases come from fixed seeds; a failure names the case.

#[path = "../../engine/tests/fuzz_common/mod.rs"]
mod fuzz_common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use fuzz_common::{cuts, flip, garbage, raw_data_ranges, tiny_bytes, Rng, Tally, LAYOUTS};
use slm_engine::{Model, Placement};
use slm_wasi_nn::{load_bytes, ErrorKind};

/// Whether `builders` loaded; a failure must be invalid-argument (the caller's bytes).
fn load(builders: &[&[u8]]) -> bool {
    match load_bytes(builders, &Placement::Cpu) {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
            assert!(!e.message.is_empty());
            false
        }
    }
}

#[test]
fn corrupted_models_are_invalid_arguments() {
    let started = Instant::now();
    let mut rng = Rng(0x6c6f_6164);
    let mut tally = Tally::new();
    for file in LAYOUTS {
        let original = tiny_bytes(file);
        let len = original.len();
        for cut in cuts(&mut rng, len, 20) {
            tally.run(
                || format!("{file} cut to {cut}"),
                || load(&[&original[..cut]]),
            );
        }
        let raw = raw_data_ranges(&original);
        for case in 0..30 {
            let (bytes, edits) = flip(&mut rng, &original, &raw);
            tally.run(
                || format!("{file} flip case {case}: (offset, old, new) {edits:?}"),
                || load(&[&bytes]),
            );
        }
    }
    for case in 0..100 {
        let bytes = garbage(&mut rng);
        tally.run(
            || format!("garbage case {case}: {bytes:02x?}"),
            || load(&[&bytes]),
        );
    }
    // Not one builder: none, two.
    tally.run(|| "no builder".into(), || load(&[]));
    let tiny = tiny_bytes("model.onnx");
    tally.run(|| "two builders".into(), || load(&[&tiny, &tiny]));
    tally.check("corrupted", started, |_| true);
}

/// A protobuf written by hand: what the engine's fuzzing found makes tract panic, kept small.
mod pb {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Field `field` of wire type 2 (bytes, strings, messages).
    pub fn bytes(field: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        varint(field << 3 | 2, &mut out);
        varint(payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// Field `field` of wire type 0 (integers).
    pub fn int(field: u64, v: u64) -> Vec<u8> {
        let mut out = vec![];
        varint(field << 3, &mut out);
        varint(v, &mut out);
        out
    }

    /// A NodeProto: inputs 1, outputs 2, op_type 4, integer attributes 5, domain 7.
    pub fn node(op: &str, domain: &str, inputs: &[&str], outputs: &[&str]) -> Vec<u8> {
        node_with(op, domain, inputs, outputs, &[])
    }

    pub fn node_with(
        op: &str,
        domain: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: &[(&str, u64)],
    ) -> Vec<u8> {
        let mut n = vec![];
        inputs.iter().for_each(|i| n.extend(bytes(1, i.as_bytes())));
        outputs
            .iter()
            .for_each(|o| n.extend(bytes(2, o.as_bytes())));
        n.extend(bytes(4, op.as_bytes()));
        for (name, v) in attributes {
            // AttributeProto: name 1, i 3, type 20 (INT = 2).
            let a = [bytes(1, name.as_bytes()), int(3, *v), int(20, 2)].concat();
            n.extend(bytes(5, &a));
        }
        n.extend(bytes(7, domain.as_bytes()));
        n
    }

    /// A ValueInfoProto of a float tensor [2, 3].
    pub fn value(name: &str) -> Vec<u8> {
        let dim = |d| bytes(1, &int(1, d));
        let shape = [dim(2), dim(3)].concat();
        let tensor = [int(1, 1), bytes(2, &shape)].concat();
        [bytes(1, name.as_bytes()), bytes(2, &bytes(1, &tensor))].concat()
    }

    /// A ModelProto (ir_version 8, opsets 17 and com.microsoft 1) of one graph.
    pub fn model(
        nodes: &[Vec<u8>],
        initializers: &[Vec<u8>],
        input: &str,
        output: &str,
    ) -> Vec<u8> {
        let mut g = vec![];
        nodes.iter().for_each(|n| g.extend(bytes(1, n)));
        g.extend(bytes(2, b"g"));
        initializers.iter().for_each(|t| g.extend(bytes(5, t)));
        g.extend(bytes(11, &value(input)));
        g.extend(bytes(12, &value(output)));
        let opset = |domain: &str, v| [bytes(1, domain.as_bytes()), int(2, v)].concat();
        [
            int(1, 8),
            bytes(8, &opset("", 17)),
            bytes(8, &opset("com.microsoft", 1)),
            bytes(7, &g),
        ]
        .concat()
    }
}

/// Graphs on which tract 0.23.9's ONNX front end panics instead of failing (found by the
/// engine's fuzz_load.rs): an unchecked `inputs[0]` in Transpose's and MatMulNBits's rules, an
/// `unimplemented!` for raw string tensors, a map lookup of an output that no node makes.
/// `load_bytes` catches the panic: the guest gets invalid-argument and the host carries on.
#[test]
fn graphs_that_panic_in_tract_are_invalid_arguments() {
    let string_tensor = [
        pb::int(1, 1),                 // dims [1]
        pb::int(2, 8),                 // data_type STRING
        pb::bytes(8, b"c"),            // name
        pb::bytes(9, b"\x01\x02\x03"), // raw_data
    ]
    .concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "Transpose without inputs",
            pb::model(&[pb::node("Transpose", "", &[], &["y"])], &[], "x", "y"),
        ),
        (
            "MatMulNBits without inputs",
            pb::model(
                &[pb::node_with(
                    "MatMulNBits",
                    "com.microsoft",
                    &[],
                    &["y"],
                    &[("K", 64), ("N", 2), ("bits", 4), ("block_size", 32)],
                )],
                &[],
                "x",
                "y",
            ),
        ),
        (
            "a raw string initializer",
            pb::model(
                &[pb::node("Identity", "", &["c"], &["y"])],
                &[string_tensor],
                "x",
                "y",
            ),
        ),
        (
            "an output that no node makes",
            pb::model(&[pb::node("Identity", "", &["x"], &["y"])], &[], "x", "z"),
        ),
    ];
    let started = Instant::now();
    let mut tally = Tally::new();
    let mut tract_panics = 0;
    for (name, bytes) in &cases {
        // Whether the engine itself panics on it (tract's to fix; a newer tract may not).
        tally.run(
            || format!("{name}: Model::from_bytes"),
            || {
                let r = catch_unwind(AssertUnwindSafe(|| Model::from_bytes(bytes)));
                tract_panics += r.is_err() as usize;
                assert!(!matches!(r, Ok(Ok(_))), "{name}: loaded");
                false
            },
        );
        tally.run(
            || format!("{name}: load_bytes"),
            || {
                assert!(!load(&[bytes]), "{name}: loaded");
                false
            },
        );
    }
    eprintln!(
        "{tract_panics} of {} graphs panic inside tract",
        cases.len()
    );
    tally.check("tract panics", started, |_| true);
}
