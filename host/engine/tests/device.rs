//! Device selection (src/model/device.rs) on a machine with or without a GPU, and the GPU plan's
//! graph (plain tract-onnx, f32 weights) run on the CPU against the default engine: everything
//! of the GPU path but tract-cuda itself.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{argmax, max_diff, step, tiny_dir};
use slm_engine::{Device, Model, Placement, Session};

fn tiny() -> PathBuf {
    tiny_dir().join("model.onnx")
}

#[test]
fn devices_resolve_and_a_missing_gpu_is_one_line() {
    assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
    assert_eq!("gpu".parse::<Device>(), Ok(Device::Gpu));
    assert_eq!("auto".parse::<Device>(), Ok(Device::Auto));
    assert!("tpu".parse::<Device>().is_err());
    assert_eq!(slm_engine::resolve(Device::Cpu), Ok(Placement::Cpu));
    match slm_engine::gpu() {
        Ok(g) => {
            // A machine with a usable GPU (and a `gpu` build): auto and gpu both pick it.
            assert_eq!(
                slm_engine::resolve(Device::Gpu),
                Ok(Placement::Gpu(g.clone()))
            );
            assert_eq!(slm_engine::resolve(Device::Auto), Ok(Placement::Gpu(g)));
        }
        Err(why) => {
            assert_eq!(slm_engine::resolve(Device::Auto), Ok(Placement::Cpu));
            assert_eq!(slm_engine::resolve(Device::Gpu), Err(why.clone()));
            assert!(!why.contains('\n') && !why.is_empty(), "{why:?}");
            if slm_engine::GPU_BUILT {
                // What is missing: the driver library, a CUDA library, or a device.
                assert!(why.contains("not found") || why.contains("CUDA"), "{why}");
            } else {
                assert_eq!(why, slm_engine::NOT_BUILT);
                assert!(why.contains("--features gpu"), "{why}");
            }
        }
    }
}

#[test]
fn gpu_placement_without_a_gpu_is_an_error_not_a_panic() {
    if slm_engine::gpu().is_ok() {
        return; // covered by scripts/gpu-check on a GPU machine
    }
    let fake = Placement::Gpu(slm_engine::GpuInfo {
        ordinal: 0,
        name: "none".into(),
        memory_mib: 0,
    });
    let e = Model::load_on(&tiny(), &fake).expect_err("no GPU here");
    assert!(!e.to_string().contains('\n'), "{e}");
    let bytes = std::fs::read(tiny()).unwrap();
    assert!(Model::from_bytes_on(&bytes, &fake).is_err());
    // The CPU placement is the default engine.
    let m = Model::load_on(&tiny(), &Placement::Cpu).unwrap();
    assert!(m.q4_1_matmuls() > 0 && m.q8_heads() == 1);
}

/// The GPU plan's graph on the CPU agrees with the default engine, and keeps the session
/// contract: prefill == token by token, rewind == fresh run, snapshot restore. On the int8 file,
/// whose kernels keep activations f32, to f32 rounding; on the default (Q4_1) file, whose
/// MatMulNBits the plain plan runs on dequantized f32 weights, within the 8-bit rounding of the
/// activations that our Q4_1 kernels do (engine.rs: TOL_Q4_1). The default engine's KV cache
/// holds float16 keys and values, the plain plan's f32 ones: [`TOL_F16_KV`] between them.
/// Logits of the default engine (a float16 KV cache, 2^-11 relative rounding per key and value)
/// against an f32 cache on the tiny model: 0.005 measured.
const TOL_F16_KV: f32 = 0.02;

#[test]
fn plain_plan_matches_the_default_engine() {
    let ids = [1i64, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
    let q4_plain = Arc::new(Model::load_plain(&tiny()).unwrap());
    let q4 = Arc::new(Model::load(&tiny()).unwrap());
    let (a, b) = (
        step(&mut Session::new(q4_plain), &ids, 0),
        step(&mut Session::new(q4), &ids, 0),
    );
    assert!(
        max_diff(&a, &b) < 2.5 && argmax(&a) == argmax(&b),
        "Q4_1 plain vs default: {}",
        max_diff(&a, &b)
    );

    let int8 = tiny().with_file_name("model_int8.onnx");
    let plain = Arc::new(Model::load_plain(&int8).unwrap());
    let default = Arc::new(Model::load(&int8).unwrap());
    assert_eq!(plain.input_names(), default.input_names());
    assert_eq!(plain.output_names(), default.output_names());
    assert_eq!(plain.info().vocab, default.info().vocab);
    assert_eq!(
        plain.int8_matmuls(),
        0,
        "the plain plan has none of our CPU ops"
    );
    // On the GPU, every KV input's Concat stays on the CPU (an empty cache is never uploaded).
    let on_cpu = Model::gpu_cpu_nodes(&tiny()).unwrap();
    let concats = on_cpu.iter().filter(|n| n.contains("Concat")).count();
    assert_eq!(concats, 2 * plain.info().layers, "{on_cpu:?}");
    assert!(on_cpu.len() <= 2 * concats, "{on_cpu:?}");

    let (mut p, mut d) = (Session::new(plain.clone()), Session::new(default));
    let a = step(&mut p, &ids, 0);
    let b = step(&mut d, &ids, 0);
    assert!(
        max_diff(&a, &b) < TOL_F16_KV,
        "plain vs default: {}",
        max_diff(&a, &b)
    );
    for (i, t) in [2i64, 198, 1].into_iter().enumerate() {
        let pos = ids.len() + i;
        let (x, y) = (step(&mut p, &[t], pos), step(&mut d, &[t], pos));
        assert!(
            max_diff(&x, &y) < TOL_F16_KV,
            "step {i}: {}",
            max_diff(&x, &y)
        );
    }
    // Rewind into the prompt and recompute its end: the prefill's logits again.
    let again = step(&mut p, &ids[4..], 4);
    assert!(
        max_diff(&again, &a) < 1e-4,
        "rewind: {}",
        max_diff(&again, &a)
    );
    // A new session seeded from a snapshot.
    let snap = p.snapshot();
    let mut q = Session::new(plain);
    q.restore(&snap, ids.len() - 1).unwrap();
    let last = step(&mut q, &ids[ids.len() - 1..], ids.len() - 1);
    assert!(
        max_diff(&last, &a) < 1e-4,
        "snapshot: {}",
        max_diff(&last, &a)
    );
}
