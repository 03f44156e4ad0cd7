//! The weight layouts of the default (`q4_1`) model, computed as scripts/slmconv computes them
//! (numpy's f32 arithmetic, rounding half to even), so both converters write the same bytes.

use half::f16;
use slm_gguf::GgmlType;

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

/// Q4_1 blocks of 32 along each row, as ONNX Runtime's MatMulNBits takes them: value =
/// `d * q + m`, with each block's `d` and `m` given (row-major, one per block): a Q4_0 or Q4_1
/// file's own, so every weight comes back exactly as the file holds it (scripts/slmconv finds the
/// same `d` and `m` from a Q4_1 block's range). Returns the nibbles (`[rows, cols / 32, 16]`, low
/// nibble first), the scales `d` and the zero points `-m / d`.
pub fn q4_1_blocks(w: &Matrix, d: &[f32], m: &[f32]) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
    let blocks = w.values.len() / 32;
    let (mut packed, mut scales, mut zeros) = (
        Vec::with_capacity(blocks * 16),
        Vec::with_capacity(blocks),
        Vec::with_capacity(blocks),
    );
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
        zeros.push(-m / d);
    }
    (packed, scales, zeros)
}

/// The `d` and `m` of each block of a Q4_0 (`m = -8 d`) or Q4_1 tensor's data, in file order;
/// None for other types.
pub fn q4_block_params(kind: GgmlType, data: &[u8]) -> Option<(Vec<f32>, Vec<f32>)> {
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match kind {
        GgmlType::Q4_0 => Some(
            data.chunks_exact(kind.block_bytes())
                .map(|b| (f16_at(b, 0), -8.0 * f16_at(b, 0)))
                .unzip(),
        ),
        GgmlType::Q4_1 => Some(
            data.chunks_exact(kind.block_bytes())
                .map(|b| (f16_at(b, 0), f16_at(b, 2)))
                .unzip(),
        ),
        _ => None,
    }
}

/// `w` transposed: `[cols, rows]`.
pub fn transpose<T: Copy>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len());
    for c in 0..cols {
        out.extend((0..rows).map(|r| values[r * cols + c]));
    }
    out
}
