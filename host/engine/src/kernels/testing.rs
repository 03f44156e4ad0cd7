//! What the kernels' tests share: test data, the shapes of the products, the f64 reference
//! product, the threaded run.

/// A small deterministic generator (no dev-dependencies).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// In -1..1.
    pub fn f32(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
    }

    /// An int8 value as a byte: spans -127..=127 and -128.
    pub fn i8(&mut self) -> u8 {
        (self.next() % 255) as i32 as u8 ^ 0x80
    }
}

/// The `(m, k, n)` every quantized product is checked on: K in whole blocks of 32 (the Q4_1 and
/// Q8 unit), up to the default model's 576 and 1536; one row (decode) or several (prefill, below,
/// at and past the 4-row tiles); N from 1 to 1536, in whole and partial panels of 32 and 64.
pub const SHAPES: [(usize, usize, usize); 17] = [
    (1, 32, 1),
    (1, 64, 32),
    (1, 64, 33),
    (1, 96, 77),
    (1, 576, 128),
    (1, 576, 192),
    (1, 1536, 64),
    (1, 1536, 130),
    (2, 32, 33),
    (2, 96, 70),
    (3, 64, 200),
    (3, 128, 64),
    (4, 64, 40),
    (5, 576, 96),
    (5, 576, 576),
    (9, 96, 1536),
    (9, 160, 70),
];

/// `x @ w` in f64 for `x` `[m, K]` and `w` `[K, N]` (row-major).
pub fn reference_kn(w: &[f32], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            y[r * n + c] = (0..k)
                .map(|kk| x[r * k + kk] as f64 * w[kk * n + c] as f64)
                .sum();
        }
    }
    y
}

/// `matmul(y)` on the calling thread, then (with the `threads` feature) split over 2 threads:
/// the same result to the bit. Returns it.
pub fn same_on_threads(len: usize, matmul: impl Fn(&mut [f32]) + Sync) -> Vec<f32> {
    let mut one = vec![0f32; len];
    matmul(&mut one);
    #[cfg(feature = "threads")]
    {
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        let mut two = vec![0f32; len];
        multithread_tract_scope(Executor::multithread(2), || matmul(&mut two));
        assert_eq!(one, two, "the product split over 2 threads");
    }
    one
}
