//! Every supported type to f32, equal bit for bit to the reference dequantizer (ggml's
//! `dequantize_row_*`, and the `gguf` package's numpy port of it, which the tests compare with).
//!
//! Bit equality needs the reference's exact arithmetic: f16 scales widened to f32 first, then one
//! f32 operation at a time in its order (`(d * scale) * q`, `d * q - m`, never fused). Rust does
//! not contract `a * b + c` into an FMA, so writing it out is enough.

use half::{bf16, f16};

use crate::types::GgmlType;

/// `bytes` (whole blocks of `kind`) as f32 values.
pub fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; values_in(kind, bytes)];
    dequantize_into(kind, bytes, &mut out);
    out
}

/// As [`dequantize`], into `out`, which must hold exactly the values of `bytes`.
///
/// # Panics
/// When `bytes` is not whole blocks or `out` has another length: a caller's bug, since
/// [`crate::Gguf`] checks every tensor's size against its shape when it opens the file.
pub fn dequantize_into(kind: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(out.len(), values_in(kind, bytes), "{kind}: output length");
    let blocks = bytes.chunks_exact(kind.block_bytes());
    let outs = out.chunks_exact_mut(kind.block_len());
    let one: fn(&[u8], &mut [f32]) = match kind {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = half16(b),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2K => q2_k,
        GgmlType::Q3K => q3_k,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
    };
    for (block, y) in blocks.zip(outs) {
        one(block, y);
    }
}

fn values_in(kind: GgmlType, bytes: &[u8]) -> usize {
    assert!(
        bytes.len() % kind.block_bytes() == 0,
        "{kind}: {} bytes are not whole blocks of {}",
        bytes.len(),
        kind.block_bytes()
    );
    bytes.len() / kind.block_bytes() * kind.block_len()
}

/// A little-endian f16 at the start of `b`, widened (exactly) to f32.
fn half16(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The 4-bit values of 16 bytes: low nibbles are values 0..16, high nibbles 16..32.
fn nibble(qs: &[u8], i: usize) -> u8 {
    match i < 16 {
        true => qs[i] & 0x0F,
        false => qs[i - 16] >> 4,
    }
}

// Blocks of 32: [d: f16] [m: f16]? [qh: u32]? [qs].

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half16(b);
    for (i, y) in y.iter_mut().enumerate() {
        *y = d * (nibble(&b[2..], i) as i8 - 8) as f32;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half16(b), half16(&b[2..]));
    for (i, y) in y.iter_mut().enumerate() {
        *y = d * nibble(&b[4..], i) as f32 + m;
    }
}

/// Value `i`'s fifth bit, from the block's 32-bit high-bit word.
fn fifth_bit(qh: &[u8], i: usize) -> u8 {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    ((qh >> i) & 1) as u8
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half16(b);
    for (i, y) in y.iter_mut().enumerate() {
        let q = nibble(&b[6..], i) | fifth_bit(&b[2..], i) << 4;
        *y = d * (q as i8 - 16) as f32;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half16(b), half16(&b[2..]));
    for (i, y) in y.iter_mut().enumerate() {
        let q = nibble(&b[8..], i) | fifth_bit(&b[4..], i) << 4;
        *y = d * q as f32 + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half16(b);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

// K-quants: super-blocks of 256 values in sub-blocks of 16 or 32, each with its own scale.

/// The 2 low bits of value `i` (0..256) in Q2_K/Q3_K: each 32-byte half holds 128 values, four
/// 2-bit planes of 32.
fn two_bits(qs: &[u8], i: usize) -> u8 {
    let (half, plane, l) = (i / 128, (i % 128) / 32, i % 32);
    (qs[half * 32 + l] >> (2 * plane)) & 3
}

/// Q2_K: [scales: 16 x (min << 4 | scale)] [qs: 64] [d: f16] [dmin: f16], sub-blocks of 16.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (half16(&b[80..]), half16(&b[82..]));
    for (i, y) in y.iter_mut().enumerate() {
        let s = scales[i / 16];
        let dl = d * (s & 0x0F) as f32;
        let ml = dmin * (s >> 4) as f32;
        *y = dl * two_bits(qs, i) as f32 - ml;
    }
}

/// Q3_K: [hmask: 32] [qs: 64] [scales: 12, sixteen 6-bit values] [d: f16], sub-blocks of 16.
/// A value is its 2 low bits, less 4 where its hmask bit is clear.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = half16(&b[108..]);
    for (i, y) in y.iter_mut().enumerate() {
        let dl = d * q3_k_scale(packed, i / 16);
        let high = (hmask[i % 32] >> (i / 32)) & 1;
        let q = two_bits(qs, i) as i8 - ((high ^ 1) << 2) as i8;
        *y = dl * q as f32;
    }
}

/// Q3_K's scale of sub-block `s` (0..16), -32..32, from its 12 packed bytes: 4 low bits in
/// bytes 0..8, 2 high bits in bytes 8..12.
fn q3_k_scale(packed: &[u8], s: usize) -> f32 {
    let low = match s < 8 {
        true => packed[s] & 0x0F,
        false => packed[s - 8] >> 4,
    };
    let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
    ((low | high << 4) as i8 - 32) as f32
}

/// The `d` and `m` of each block of 32 of a Q4_0 (`m = -8 d`), Q4_1 or Q4_K tensor's `data`
/// (value = `d * q + m`, `q` in 0..16), in file order: the values [`dequantize`] gives are
/// `d * q + m` in f32 exactly (a Q4_K sub-block's `d * sc` and `-dmin * mc` are exact f32
/// products). None for other types.
pub fn q4_affine(kind: GgmlType, data: &[u8]) -> Option<(Vec<f32>, Vec<f32>)> {
    let blocks = data.chunks_exact(kind.block_bytes());
    match kind {
        GgmlType::Q4_0 => Some(blocks.map(|b| (half16(b), -8.0 * half16(b))).unzip()),
        GgmlType::Q4_1 => Some(blocks.map(|b| (half16(b), half16(&b[2..]))).unzip()),
        GgmlType::Q4K => Some(blocks.flat_map(k4_scales_and_offsets).unzip()),
        _ => None,
    }
}

/// The blocks of a Q8_0, Q5_0, Q6_K or Q3_K tensor's `data` as int8 blocks (value = `s * q`,
/// `q` an integer in -128..128): their length and each one's scale `s`, in file order: Q8_0's
/// and Q5_0's `d` per 32 values, Q6_K's `d * scale` and Q3_K's `d * (scale - 32)` per 16 (exact
/// f32 products of a float16 and a 6- or 8-bit integer). None for other types.
pub fn int8_scales(kind: GgmlType, data: &[u8]) -> Option<(usize, Vec<f32>)> {
    let blocks = data.chunks_exact(kind.block_bytes());
    match kind {
        GgmlType::Q8_0 | GgmlType::Q5_0 => Some((32, blocks.map(half16).collect())),
        GgmlType::Q6K => Some((
            16,
            blocks
                .flat_map(|b| {
                    let d = half16(&b[208..]);
                    (0..16).map(move |i| d * b[192 + i] as i8 as f32)
                })
                .collect(),
        )),
        GgmlType::Q3K => Some((
            16,
            blocks
                .flat_map(|b| {
                    let d = half16(&b[108..]);
                    (0..16).map(move |s| d * q3_k_scale(&b[96..108], s))
                })
                .collect(),
        )),
        _ => None,
    }
}

/// The blocks of a Q5_1, Q5_K or Q2_K tensor's `data` as int8 blocks with an offset (value =
/// `s * q + o`, `q` an integer in 0..32): their length and each one's `s` and `o`, in file order:
/// Q5_1's `d` and `m` per 32 values, Q5_K's `d * sc` and `-(dmin * m)` per 32, Q2_K's per 16
/// (exact f32 products). [`dequantize`] gives `s * q + o` computed in f32. None for other types.
pub fn int8_affine(kind: GgmlType, data: &[u8]) -> Option<(usize, Vec<f32>, Vec<f32>)> {
    let blocks = data.chunks_exact(kind.block_bytes());
    let (block, (s, o)) = match kind {
        GgmlType::Q5_1 => (32, blocks.map(|b| (half16(b), half16(&b[2..]))).unzip()),
        GgmlType::Q5K => (32, blocks.flat_map(k4_scales_and_offsets).unzip()),
        GgmlType::Q2K => (
            16,
            blocks
                .flat_map(|b| {
                    let (d, dmin) = (half16(&b[80..]), half16(&b[82..]));
                    b[..16]
                        .iter()
                        .map(move |&sc| (d * (sc & 0x0F) as f32, -(dmin * (sc >> 4) as f32)))
                })
                .unzip(),
        ),
        _ => return None,
    };
    Some((block, s, o))
}

/// Each sub-block's `d * sc` and `-(dmin * m)` of a Q4_K or Q5_K super-block `b` (both start
/// `[d: f16] [dmin: f16] [scales: 12]`): exact f32 products.
fn k4_scales_and_offsets(b: &[u8]) -> impl Iterator<Item = (f32, f32)> + '_ {
    let (d, dmin) = (half16(b), half16(&b[2..]));
    (0..8).map(move |j| {
        let (sc, m) = scale_min_k4(&b[4..16], j);
        (d * sc as f32, -(dmin * m as f32))
    })
}

/// The 6-bit scale and min of sub-block `j` (0..8) of Q4_K/Q5_K's 12 packed bytes.
fn scale_min_k4(packed: &[u8], j: usize) -> (u8, u8) {
    match j < 4 {
        true => (packed[j] & 0x3F, packed[j + 4] & 0x3F),
        false => (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 2) & 0x30),
            (packed[j + 4] >> 4) | ((packed[j] >> 2) & 0x30),
        ),
    }
}

/// The 4 low bits of value `i` in Q4_K/Q5_K: each 32 bytes hold two sub-blocks of 32, low
/// nibbles first.
fn k_nibble(qs: &[u8], i: usize) -> u8 {
    let (sub, l) = (i / 32, i % 32);
    (qs[(sub / 2) * 32 + l] >> (4 * (sub % 2))) & 0x0F
}

/// Q4_K: [d: f16] [dmin: f16] [scales: 12] [qs: 128], sub-blocks of 32.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin, packed, qs) = (half16(b), half16(&b[2..]), &b[4..16], &b[16..144]);
    for (i, y) in y.iter_mut().enumerate() {
        let (sc, m) = scale_min_k4(packed, i / 32);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        *y = dl * k_nibble(qs, i) as f32 - ml;
    }
}

/// Q5_K: [d: f16] [dmin: f16] [scales: 12] [qh: 32] [qs: 128], sub-blocks of 32; sub-block `j`'s
/// fifth bits are bit `j` of the 32 qh bytes.
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin, packed) = (half16(b), half16(&b[2..]), &b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for (i, y) in y.iter_mut().enumerate() {
        let sub = i / 32;
        let (sc, m) = scale_min_k4(packed, sub);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        let q = k_nibble(qs, i) | ((qh[i % 32] >> sub) & 1) << 4;
        *y = dl * q as f32 - ml;
    }
}

/// Q6_K: [ql: 128] [qh: 64] [scales: 16 x i8] [d: f16], sub-blocks of 16. Each half of 128
/// values takes 64 ql bytes (low nibbles, then high) and 32 qh bytes (four 2-bit planes).
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half16(&b[208..]);
    for (i, y) in y.iter_mut().enumerate() {
        let (half, group, l) = (i / 128, (i % 128) / 32, i % 32);
        let byte = ql[half * 64 + (group % 2) * 32 + l];
        let low = (byte >> (4 * (group / 2))) & 0x0F;
        let high = (qh[half * 32 + l] >> (2 * group)) & 3;
        let q = (low | high << 4) as i8 - 32;
        let dl = d * scales[i / 16] as i8 as f32;
        *y = dl * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-made blocks whose values are known without a reference (the reference comparison is
    /// tests/dequantize.rs, against the `gguf` package).
    #[test]
    fn q4_0_and_q8_0_blocks_by_hand() {
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2] = 0xF0; // value 0: nibble 0 -> -8; value 16: nibble 15 -> 7
        let y = dequantize(GgmlType::Q4_0, &block);
        assert_eq!((y[0], y[16], y[1]), (-4.0, 3.5, -4.0));

        let mut block = vec![0u8; 34];
        block[..2].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        block[2] = (-128i8) as u8;
        block[33] = 127;
        let y = dequantize(GgmlType::Q8_0, &block);
        assert_eq!((y[0], y[31], y[1]), (-32.0, 31.75, 0.0));
    }

    /// Random blocks (finite f16 fields) of `kind`.
    fn random_blocks(kind: GgmlType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let mut data: Vec<u8> = (0..blocks * kind.block_bytes()).map(|_| next()).collect();
        // The f16 fields: d (and dmin) first, Q6_K's d last; kept finite and small.
        let f16_fields: &[usize] = match kind {
            GgmlType::Q6K => &[208],
            GgmlType::Q3K => &[108],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5_1 | GgmlType::Q5K => &[0, 2],
            _ => &[0],
        };
        for b in data.chunks_exact_mut(kind.block_bytes()) {
            for &at in f16_fields {
                let h = f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]) & 0xB7FF);
                b[at..at + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        data
    }

    /// Every value is `d * q + m` with q in 0..16, computed in f32: what the engine multiplies
    /// (equal as numbers: Q4_0's `d * (q - 8)` gives -0 where `d * q + m` gives +0).
    #[test]
    fn q4_affine_gives_every_value_exactly() {
        for kind in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q4K] {
            let data = random_blocks(kind, 64, kind as u64);
            let values = dequantize(kind, &data);
            let (d, m) = q4_affine(kind, &data).unwrap();
            assert_eq!(d.len(), values.len() / 32);
            for (i, v) in values.iter().enumerate() {
                let (d, m) = (d[i / 32], m[i / 32]);
                let found = (0..16u8).any(|q| d * q as f32 + m == *v);
                assert!(
                    found,
                    "{kind} value {i}: {v} is no d * q + m (d={d}, m={m})"
                );
            }
        }
        assert!(q4_affine(GgmlType::Q6K, &random_blocks(GgmlType::Q6K, 1, 1)).is_none());
    }

    /// Every value is `s * q` with q an integer in -128..128, exactly.
    #[test]
    fn int8_scales_give_every_value_exactly() {
        for kind in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q6K, GgmlType::Q3K] {
            let data = random_blocks(kind, 64, kind as u64);
            let values = dequantize(kind, &data);
            let (block, s) = int8_scales(kind, &data).unwrap();
            assert_eq!(s.len(), values.len() / block);
            for (i, v) in values.iter().enumerate() {
                let s = s[i / block];
                let found = (-128..128).any(|q| (s * q as f32).to_bits() == v.to_bits());
                assert!(found, "{kind} value {i}: {v} is no s * q (s={s})");
            }
        }
        assert!(int8_scales(GgmlType::Q4K, &random_blocks(GgmlType::Q4K, 1, 1)).is_none());
    }

    /// Every value is `s * q + o` with q in 0..32, computed in f32, bit for bit.
    #[test]
    fn int8_affine_gives_every_value_exactly() {
        for kind in [GgmlType::Q5_1, GgmlType::Q5K, GgmlType::Q2K] {
            let data = random_blocks(kind, 64, kind as u64);
            let values = dequantize(kind, &data);
            let (block, s, o) = int8_affine(kind, &data).unwrap();
            assert_eq!(
                (s.len(), o.len()),
                (values.len() / block, values.len() / block)
            );
            for (i, v) in values.iter().enumerate() {
                let (s, o) = (s[i / block], o[i / block]);
                let found = (0..32).any(|q| (s * q as f32 + o).to_bits() == v.to_bits());
                assert!(
                    found,
                    "{kind} value {i}: {v} is no s * q + o (s={s}, o={o})"
                );
            }
        }
        assert!(int8_affine(GgmlType::Q6K, &random_blocks(GgmlType::Q6K, 1, 1)).is_none());
    }

    #[test]
    #[should_panic(expected = "not whole blocks")]
    fn a_partial_block_is_a_bug_not_a_guess() {
        dequantize(GgmlType::Q4K, &[0; 100]);
    }
}
