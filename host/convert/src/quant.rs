//! The weight layouts of the default (`q4_1`) model, computed as scripts/slmconv computes them
//! (numpy's f32 arithmetic, rounding half to even), so both converters write the same bytes.

/// A weight in Hugging Face layout: `rows` output channels of `cols` inputs, row-major.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, r: usize) -> &[f32] {
        &self.values[r * self.cols..(r + 1) * self.cols]
    }

    /// Undoes llama.cpp's Q/K row permutation (interleaved RoPE pairs back to rotate-half
    /// halves): within each head, row `2j + a` moves to `a * half + j`.
    pub fn unpermute_rope(&self, heads: usize) -> Matrix {
        let per_head = self.rows / heads;
        let half = per_head / 2;
        let mut values = Vec::with_capacity(self.values.len());
        for h in 0..heads {
            for a in 0..2 {
                for j in 0..half {
                    values.extend_from_slice(self.row(h * per_head + 2 * j + a));
                }
            }
        }
        Matrix {
            rows: self.rows,
            cols: self.cols,
            values,
        }
    }
}

/// Symmetric int8 with one scale per row: `scale = max|w| / 127`, `q = round(w / scale)`.
pub fn int8_rows(w: &Matrix) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(w.values.len());
    let mut scales = Vec::with_capacity(w.rows);
    for r in 0..w.rows {
        let row = w.row(r);
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = match max / 127.0 {
            0.0 => 1.0,
            s => s,
        };
        q.extend(
            row.iter()
                .map(|v| (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8),
        );
        scales.push(scale);
    }
    (q, scales)
}

/// 4-bit blocks of 32 along each row: value = `d * q + m` with each block's `d` and `m` given
/// (row-major): a Q4_0, Q4_1 or Q4_K file's own, so every weight comes back exactly as the file
/// holds it (scripts/slmconv finds the same `d` and `m` from a Q4_1 block's range).
/// Returns the nibbles (`[rows, cols / 32, 16]`, low nibble first) and the scales (a `d` of 0,
/// a constant block, becomes 1 with q = 0).
pub fn q4_blocks(w: &Matrix, d: &[f32], m: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let blocks = w.values.len() / 32;
    let (mut packed, mut scales) = (Vec::with_capacity(blocks * 16), Vec::with_capacity(blocks));
    for ((block, &d), &m) in w.values.chunks_exact(32).zip(d).zip(m) {
        // Q4_0's d may be negative (llama.cpp scales by the signed extreme); 0 is a constant
        // block: q = 0, value = m.
        let d = if d != 0.0 { d } else { 1.0 };
        let q: Vec<u8> = block
            .iter()
            .map(|v| ((v - m) / d).round_ties_even().clamp(0.0, 15.0) as u8)
            .collect();
        packed.extend(q.chunks_exact(2).map(|p| p[0] | p[1] << 4));
        scales.push(d);
    }
    (packed, scales)
}

/// int8 blocks of `block` values along each row, as `MatMulNBits` with 8 bits and no zero point
/// (128) takes them: value = `s * q`, each block's `s` given (row-major): a Q8_0, Q5_0 or Q6_K
/// file's own, so `q = w / s` is an exact integer. Returns `q + 128` (`[rows, cols / block,
/// block]`) and the scales; None when a value is not `s` times an integer in -127..=127.
pub fn int8_blocks(w: &Matrix, s: &[f32], block: usize) -> Option<(Vec<u8>, Vec<f32>)> {
    let mut q = Vec::with_capacity(w.values.len());
    for (block, &s) in w.values.chunks_exact(block).zip(s) {
        for &v in block {
            let i = if s != 0.0 { v / s } else { 0.0 };
            if i.fract() != 0.0 || !(-127.0..=127.0).contains(&i) || (s == 0.0 && v != 0.0) {
                return None;
            }
            q.push((i as i32 + 128) as u8);
        }
    }
    Some((q, s.to_vec()))
}

/// Blocks of `block` values along each row as value = `s * q + o`, `q` in 0..32, each block's
/// `s` and `o` given (row-major): a Q5_1, Q5_K or Q2_K file's own, so each `q` comes back
/// exactly. Returns the `q` (`[rows, cols / block, block]`, a byte each) and the scales and
/// offsets (a constant block, `s` = 0, becomes `s` = 1 with q = 0); None when a value is not
/// `s * q + o` in f32.
pub fn affine8_blocks(
    w: &Matrix,
    s: &[f32],
    o: &[f32],
    block: usize,
) -> Option<(Vec<u8>, Vec<f32>, Vec<f32>)> {
    let mut q = Vec::with_capacity(w.values.len());
    let mut scales = Vec::with_capacity(s.len());
    for ((values, &s), &o) in w.values.chunks_exact(block).zip(s).zip(o) {
        let s = if s != 0.0 { s } else { 1.0 };
        for &v in values {
            let i = ((v - o) / s).round_ties_even().clamp(0.0, 31.0);
            if s * i + o != v {
                return None;
            }
            q.push(i as u8);
        }
        scales.push(s);
    }
    Some((q, scales, o.to_vec()))
}

/// `w` transposed: `[cols, rows]`.
pub fn transpose<T: Copy>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len());
    for c in 0..cols {
        out.extend((0..rows).map(|r| values[r * cols + c]));
    }
    out
}
