//! Matrix products against int8-block weights whose values span at most 32 integers, held in 5
//! bits: GGUF's Q5_0 (`d * (q - 16)`), Q5_1 and Q5_K (`d * q + m`, q in 0..32) and Q3_K. The
//! loader holds them as [`super::q8_blocks::Q8Blocks`] would, one byte per value, when they
//! span more. Gemma 3 270M's Q5_0 layers take 44 MB here (the file's size) against 67 MB in int8
//! blocks, and a decode step reads that much less.
//!
//! A value is `s * (lo + u)`, `lo` the weight's smallest and `u` in 0..32. The products are the
//! bits [`super::q8_blocks::Q8Blocks`] gives on the same weight: each scale's block sum is the
//! same integer, `sum(u * xq) + lo * sum(xq)`, and its float arithmetic is the same, operation
//! for operation (test: `same_bits_as_int8_blocks`).
//!
//! Layout per (panel of 32 columns, block of 32 K values), [`BLOCK_BYTES`] bytes: first the low
//! nibbles as [`super::q4_1::Q4Weights`] lays them out (4 groups of 8 K values; in a group 4
//! bytes per column, byte t holding value t in its low nibble and value 4 + t in its high one),
//! then the fifth bits: per group and 8 columns, two 32-bit masks (for the low and the high
//! nibbles; bit 4j + t for column j of the 8 and byte t), the bits of one 32-byte load of the
//! nibbles.

use super::dispatch::panel_kernels;
use super::offsets::BlockOffsets;
use super::q4_1::{BlockScale, QBLOCK};
use super::q8_blocks::{scale_index, with_scales, Scales, HALF, Q8B_PANEL};
use super::quantize::{Activations, QuantRows};

/// Columns per panel.
pub const Q5_PANEL: usize = Q8B_PANEL;
/// Nibble bytes of one (panel, block of 32).
const NIBBLE_BYTES: usize = Q5_PANEL * QBLOCK / 2;
/// Bytes of one (panel, block of 32): nibbles, then fifth bits.
const BLOCK_BYTES: usize = NIBBLE_BYTES + Q5_PANEL * QBLOCK / 8;
/// Groups of 8 K values per scale, by scales per block of 32 (1 or 2).
const GROUPS_PER_SCALE: [usize; 3] = [0, 4, 2];

/// An int8-block weight `[K, N]` held in 5 bits, with a scale per 16 or 32 values.
pub struct Q5Blocks {
    pub k: usize,
    pub n: usize,
    bits: Vec<u8>,
    /// The smallest value: a weight is `s * (lo + u)`.
    lo: i32,
    /// By (panel, half-block, column), or (panel, block, column) with one scale per 32, as
    /// [`super::q8_blocks::Q8Blocks`] holds them.
    scale: Scales,
    scales_per_block: usize,
    activations: Activations,
    offsets: Option<BlockOffsets>,
}

impl std::fmt::Debug for Q5Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q5Blocks {{ k: {}, n: {}", self.k, self.n)?;
        if let Some(o) = &self.offsets {
            write!(f, ", offsets per {}", o.per())?;
        }
        write!(f, " }}")
    }
}

impl Q5Blocks {
    /// `bytes` `[N][K]` and `scale` `[N][K/per]` as [`super::q8_blocks::Q8Blocks::check`]
    /// accepted them (two's complement, or `q + 128` when `biased`), in 5 bits; `None` when the
    /// values span more than 32 integers.
    pub(crate) fn pack(
        k: usize,
        n: usize,
        bytes: &[u8],
        scale: &[f32],
        per: usize,
        biased: bool,
    ) -> Option<Q5Blocks> {
        // As bytes: q, or q + 128 when biased; ordered as the values when read as i8 or u8.
        let flip = if biased { 0 } else { 0x80 };
        let (min, max) = bytes.iter().fold((u8::MAX, 0u8), |(lo, hi), &b| {
            (lo.min(b ^ flip), hi.max(b ^ flip))
        });
        if bytes.is_empty() || max - min > 31 {
            return None;
        }
        let lo = min as i32 - 128;
        // u = q - lo, in wrapping byte arithmetic on the stored bytes.
        let zero = min ^ flip;
        let (kb, panels, halves) = (k / QBLOCK, n.div_ceil(Q5_PANEL), k / per);
        // Padding columns hold u = 0 (their scales are 0).
        let mut bits = vec![0u8; panels * kb * BLOCK_BYTES];
        for c in 0..n {
            let (p, j) = (c / Q5_PANEL, c % Q5_PANEL);
            for b in 0..kb {
                let src = &bytes[c * k + b * QBLOCK..][..QBLOCK];
                let blk = &mut bits[(p * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                for g in 0..4 {
                    let (mut low_bits, mut high_bits) = (0u32, 0u32);
                    for t in 0..4 {
                        let low = src[8 * g + t].wrapping_sub(zero);
                        let high = src[8 * g + 4 + t].wrapping_sub(zero);
                        blk[g * 128 + j * 4 + t] = (low & 15) | (high & 15) << 4;
                        let i = (j % 8) * 4 + t;
                        low_bits |= ((low >> 4) as u32) << i;
                        high_bits |= ((high >> 4) as u32) << i;
                    }
                    let masks = NIBBLE_BYTES + (g * 4 + j / 8) * 8;
                    for (at, m) in [(masks, low_bits), (masks + 4, high_bits)] {
                        let word = u32::from_le_bytes(blk[at..at + 4].try_into().unwrap()) | m;
                        blk[at..at + 4].copy_from_slice(&word.to_le_bytes());
                    }
                }
            }
        }
        Some(Q5Blocks {
            k,
            n,
            bits,
            lo,
            scale: Scales::in_panels(scale, n, halves),
            scales_per_block: QBLOCK / per,
            activations: Activations::default(),
            offsets: None,
        })
    }

    /// The same weight plus an offset per block of `per` values (16 or 32): `s * q + o`, `o`
    /// `[N][K/per]` (tests; the loader checks them first: [`Self::with_block_offsets`]).
    #[cfg(test)]
    pub fn with_offsets(self, per: usize, o: &[f32]) -> Result<Self, String> {
        let offsets = BlockOffsets::new(self.k, self.n, per, o)?;
        Ok(self.with_block_offsets(offsets))
    }

    /// The same weight plus `offsets` (made for its K and N).
    pub(crate) fn with_block_offsets(self, offsets: BlockOffsets) -> Self {
        Q5Blocks {
            offsets: Some(offsets),
            ..self
        }
    }

    /// The same weight, its products rounding activations as `activations` says.
    pub fn with_activations(self, activations: Activations) -> Self {
        Q5Blocks {
            activations,
            ..self
        }
    }

    /// Output channel `c`'s K values, `s * q` (plus its offset): a tied embedding's row,
    /// exactly as the file's.
    pub fn copy_column(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        for (kk, o) in out.iter_mut().enumerate() {
            *o = self.value(kk, c);
        }
    }

    /// The weight's value at (k, column c), as the kernels multiply it.
    fn value(&self, kk: usize, c: usize) -> f32 {
        let (p, j) = (c / Q5_PANEL, c % Q5_PANEL);
        let (b, r) = (kk / QBLOCK, kk % QBLOCK);
        let (g, t, high) = (r / 8, r % 4, r % 8 >= 4);
        let base = (p * (self.k / QBLOCK) + b) * BLOCK_BYTES;
        let nibbles = self.bits[base + g * 128 + j * 4 + t];
        let (byte, bit) = fifth_bit(g, j, t, high);
        let u = if high { nibbles >> 4 } else { nibbles & 15 }
            | (self.bits[base + byte] >> bit & 1) << 4;
        let kb = self.k / QBLOCK;
        let at = match self.scales_per_block {
            1 => scale_index::<1>(kb, p, b, r / HALF),
            _ => scale_index::<2>(kb, p, b, r / HALF),
        };
        let v = self.scale.get(at + j) * (self.lo + u as i32) as f32;
        match &self.offsets {
            Some(o) => v + o.at(self.k, c, kk),
            None => v,
        }
    }
}

/// Where the fifth bit of (group g, column j, byte t, high or low nibble) is in a block: byte
/// offset and bit.
fn fifth_bit(g: usize, j: usize, t: usize, high: bool) -> (usize, usize) {
    let i = (j % 8) * 4 + t;
    let mask = NIBBLE_BYTES + (g * 4 + j / 8) * 8 + if high { 4 } else { 0 };
    (mask + i / 8, i % 8)
}

panel_kernels!(Q5Blocks, Q5_PANEL, offsets);

mod portable {
    use super::*;

    /// The order of operations every kernel follows, rounding for rounding (that of the int8
    /// blocks' portable kernel, on the same integers).
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels(w: &Q5Blocks, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
        // SAFETY: the caller's contract, passed on.
        unsafe { with_scales!(w, panels_with, [], (x, m, y, p0, p1)) }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`; `scales` are `w`'s.
    unsafe fn panels_with<const SPB: usize, S: BlockScale>(
        w: &Q5Blocks,
        scales: &[S],
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        let per = QBLOCK / SPB;
        for p in p0..p1 {
            for row in 0..m {
                let mut facc = [0f32; Q5_PANEL];
                for b in 0..kb {
                    let blk = &w.bits[(p * kb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let xq = &x.q[row * k + b * QBLOCK..][..QBLOCK];
                    let xs = x.scale[row * kb + b];
                    for h in 0..SPB {
                        let s = &scales[scale_index::<SPB>(kb, p, b, h)..][..Q5_PANEL];
                        for (j, f) in facc.iter_mut().enumerate() {
                            let mut acc = 0i32;
                            for r in per * h..per * (h + 1) {
                                let (g, t, high) = (r / 8, r % 4, r % 8 >= 4);
                                let nibbles = blk[g * 128 + j * 4 + t];
                                let (byte, bit) = fifth_bit(g, j, t, high);
                                let u = if high { nibbles >> 4 } else { nibbles & 15 }
                                    | (blk[byte] >> bit & 1) << 4;
                                acc += (w.lo + u as i32) * xq[r] as i32;
                            }
                            *f += acc as f32 * (s[j].to_f32() * xs);
                        }
                    }
                }
                for (j, v) in facc[..Q5_PANEL.min(n - p * Q5_PANEL)].iter().enumerate() {
                    // SAFETY: row < m and column p * 32 + j < N, of a panel this call owns.
                    unsafe { *y.add(row * n + p * Q5_PANEL + j) = *v };
                }
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use std::arch::wasm32::*;

    use super::*;
    use crate::kernels::quantize::wasm::i8x4_twice;

    /// Rows computed together: each block's values are unpacked once for all of them.
    const TILE: usize = 4;

    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels(w: &Q5Blocks, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
        // SAFETY: the caller's contract, passed on; every tile's rows are below m.
        unsafe {
            for p in p0..p1 {
                let mut row = 0;
                while row + TILE <= m {
                    with_scales!(w, tile, [TILE,], (x, p, row, y));
                    row += TILE;
                }
                while row < m {
                    with_scales!(w, tile, [1,], (x, p, row, y));
                    row += 1;
                }
            }
        }
    }

    /// 16 bytes, 16 if bit i of `mask` is set, else 0.
    #[inline(always)]
    fn fifth_bits(mask: u16) -> v128 {
        let bytes = i8x16_swizzle(
            u16x8_splat(mask),
            i8x16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        );
        let bit = u8x16(1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128);
        v128_and(i8x16_eq(v128_and(bytes, bit), bit), u8x16_splat(16))
    }

    /// Panel `p` for rows `row0 .. row0 + R`: the int8 blocks' simd128 tile, its weights
    /// unpacked to `lo + u` 16-bit lanes.
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`, for panel p < p1 and rows `row0 .. row0 + R` < m.
    #[inline(always)]
    unsafe fn tile<const R: usize, const SPB: usize, S: BlockScale>(
        w: &Q5Blocks,
        scales: &[S],
        x: &QuantRows,
        p: usize,
        row0: usize,
        y: *mut f32,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        let (nib, lo) = (u8x16_splat(15), i16x8_splat(w.lo as i16));
        let mut facc = [[f32x4_splat(0.0); Q5_PANEL / 4]; R];
        // SAFETY: for b < K/32 the block's bytes and its scales are inside `w`; for the tile's
        // rows, their 32 quantized values and scale are inside `x`, and columns
        // p * 32 .. p * 32 + cols of their outputs are inside y, in a panel this call owns.
        unsafe {
            for b in 0..kb {
                let blk = w.bits.as_ptr().add((p * kb + b) * BLOCK_BYTES);
                let mut xw = [[i32x4_splat(0); 8]; R];
                for (r, xw) in xw.iter_mut().enumerate() {
                    let xq = x.q.as_ptr().add((row0 + r) * k + b * QBLOCK);
                    for (g, xw) in xw.iter_mut().enumerate() {
                        *xw = i8x4_twice(xq.add(4 * g));
                    }
                }
                for h in 0..SPB {
                    let s = scales.as_ptr().add(scale_index::<SPB>(kb, p, b, h));
                    for c4 in 0..Q5_PANEL / 4 {
                        let mut acc = [[i32x4_splat(0); 2]; R];
                        for g in GROUPS_PER_SCALE[SPB] * h..GROUPS_PER_SCALE[SPB] * (h + 1) {
                            let v = v128_load(blk.add(g * 128 + c4 * 16) as *const v128);
                            let masks = blk.add(NIBBLE_BYTES + (g * 4 + c4 / 2) * 8 + c4 % 2 * 2);
                            let low = (masks as *const u16).read_unaligned();
                            let high = (masks.add(4) as *const u16).read_unaligned();
                            // The values of bytes t (int8 group 2g) and 4 + t (group 2g + 1).
                            let halves = [
                                v128_or(v128_and(v, nib), fifth_bits(low)),
                                v128_or(u8x16_shr(v, 4), fifth_bits(high)),
                            ];
                            for (i, u) in halves.iter().enumerate() {
                                let a = i16x8_add(u16x8_extend_low_u8x16(*u), lo);
                                let c = i16x8_add(u16x8_extend_high_u8x16(*u), lo);
                                for (acc, xw) in acc.iter_mut().zip(&xw) {
                                    acc[0] = i32x4_add(acc[0], i32x4_dot_i16x8(a, xw[2 * g + i]));
                                    acc[1] = i32x4_add(acc[1], i32x4_dot_i16x8(c, xw[2 * g + i]));
                                }
                            }
                        }
                        let sc = S::load4(s.add(c4 * 4));
                        for (r, acc) in acc.iter().enumerate() {
                            let xs = f32x4_splat(x.scale[(row0 + r) * kb + b]);
                            let sums = i32x4_add(
                                i32x4_shuffle::<0, 2, 4, 6>(acc[0], acc[1]),
                                i32x4_shuffle::<1, 3, 5, 7>(acc[0], acc[1]),
                            );
                            facc[r][c4] = f32x4_add(
                                facc[r][c4],
                                f32x4_mul(f32x4_convert_i32x4(sums), f32x4_mul(sc, xs)),
                            );
                        }
                    }
                }
            }
            let cols = Q5_PANEL.min(n - p * Q5_PANEL);
            let mut out = [0f32; Q5_PANEL];
            for (r, facc) in facc.iter().enumerate() {
                for (c4, f) in facc.iter().enumerate() {
                    v128_store(out.as_mut_ptr().add(c4 * 4) as *mut v128, *f);
                }
                let dst = y.add((row0 + r) * n + p * Q5_PANEL);
                std::ptr::copy_nonoverlapping(out.as_ptr(), dst, cols);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::kernels::q8_blocks::x86::{tile as int8_tile, tile512 as int8_tile512};
    use crate::kernels::quantize::int_sum;

    /// The byte products and the fifth bits of one instruction set.
    trait DotU {
        /// Rows `row..row + MR` by the whole panel `p` of unpacked int8 blocks (a prefill's),
        /// by the int8 blocks' kernel on the same instructions (`NV4` vectors per tile where
        /// it takes 256-bit ones), into `out` (`[MR][Q5_PANEL]`).
        ///
        /// # Safety
        /// As `q8_blocks::x86::tile` for every column of the panel.
        #[allow(clippy::too_many_arguments)]
        unsafe fn int8_rows<const MR: usize, const NV4: usize, const SPB: usize, S: BlockScale>(
            panel: *const u8,
            k: usize,
            scales: &[S],
            p: usize,
            x: &QuantRows,
            row: usize,
            out: *mut f32,
        );

        /// `acc + sum of 4 products u * x` per 32-bit lane, for u in 0..32 (u8) and x (i8).
        ///
        /// # Safety
        /// The CPU has the instructions of the implementation.
        unsafe fn dot(acc: __m256i, u: __m256i, x: __m256i) -> __m256i;

        /// `nibbles` plus 16 in the bytes whose bit is set in the 32-bit mask at `mask`.
        ///
        /// # Safety
        /// As `dot`; `mask` points at 4 readable bytes.
        unsafe fn add_fifth_bits(nibbles: __m256i, mask: *const u32) -> __m256i;
    }

    /// AVX-512 VNNI, with BW's byte masks for the fifth bits.
    struct Vnni;
    impl DotU for Vnni {
        #[inline(always)]
        unsafe fn int8_rows<const MR: usize, const NV4: usize, const SPB: usize, S: BlockScale>(
            panel: *const u8,
            k: usize,
            scales: &[S],
            p: usize,
            x: &QuantRows,
            row: usize,
            out: *mut f32,
        ) {
            // SAFETY: the caller's ranges and CPU (AVX-512 F, BW and VNNI).
            unsafe { int8_tile512::<MR, SPB, S>(panel, k, scales, p, x, row, out) }
        }

        #[inline(always)]
        unsafe fn dot(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
            // SAFETY: the caller runs on a CPU with AVX-512 VNNI and VL.
            unsafe { _mm256_dpbusd_epi32(acc, u, x) }
        }

        #[inline(always)]
        unsafe fn add_fifth_bits(nibbles: __m256i, mask: *const u32) -> __m256i {
            // SAFETY: the caller's CPU (AVX-512 BW and VL) and 4 bytes at `mask`.
            unsafe {
                let k = _cvtu32_mask32(mask.read_unaligned());
                _mm256_mask_add_epi8(nibbles, k, nibbles, _mm256_set1_epi8(16))
            }
        }
    }

    struct Avx2;
    impl DotU for Avx2 {
        #[inline(always)]
        unsafe fn int8_rows<const MR: usize, const NV4: usize, const SPB: usize, S: BlockScale>(
            panel: *const u8,
            k: usize,
            scales: &[S],
            p: usize,
            x: &QuantRows,
            row: usize,
            out: *mut f32,
        ) {
            // SAFETY: the caller's ranges and CPU (AVX2, FMA); NV4 * 8 divides 32.
            unsafe {
                for c in (0..Q5_PANEL).step_by(8 * NV4) {
                    int8_tile::<MR, NV4, SPB, S>(panel, k, scales, p, c, x, row, out.add(c));
                }
            }
        }

        #[inline(always)]
        unsafe fn dot(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
            // Pairs stay within i16 (2 * 31 * 128).
            // SAFETY: the caller runs on a CPU with AVX2.
            unsafe {
                let pairs = _mm256_maddubs_epi16(u, x);
                _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
            }
        }

        #[inline(always)]
        unsafe fn add_fifth_bits(nibbles: __m256i, mask: *const u32) -> __m256i {
            // SAFETY: the caller's AVX2 and 4 bytes at `mask`.
            unsafe {
                // Byte i from mask byte i / 8 (each 128-bit lane shuffles its own copy).
                let spread = _mm256_setr_epi8(
                    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                    3, 3, 3, 3, 3, 3,
                );
                let m = _mm256_set1_epi32(mask.read_unaligned() as i32);
                let bytes = _mm256_shuffle_epi8(m, spread);
                let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
                _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(16)))
            }
        }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and AVX-512 VNNI and VL.
    pub unsafe fn panels_vnni(
        w: &Q5Blocks,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: the caller's contract, passed on with the features each kernel needs (every
        // CPU with AVX-512 VNNI so far has BW as well).
        unsafe {
            if std::is_x86_feature_detected!("avx512bw") {
                panels_vnni_bw(w, x, m, y, p0, p1)
            } else {
                panels_avx2(w, x, m, y, p0, p1)
            }
        }
    }

    /// # Safety
    /// As [`panels_vnni`], on a CPU with AVX-512 BW too.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vnni,avx512vl,avx512bw")]
    unsafe fn panels_vnni_bw(
        w: &Q5Blocks,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: the caller's contract; this function has the features `Vnni` needs.
        unsafe { with_scales!(w, panels, [Vnni, 4,], (x, m, y, p0, p1)) }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panels_avx2(
        w: &Q5Blocks,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // 16 vector registers: 4 rows x 16 columns of accumulators at a time.
        // SAFETY: the caller's contract; this function has the features `Avx2` needs.
        unsafe { with_scales!(w, panels, [Avx2, 2,], (x, m, y, p0, p1)) }
    }

    /// Decode's rows (fewer than 4) straight from the 5-bit blocks. A prefill's (4 or more) on
    /// each panel unpacked once into the int8 blocks' layout, by their kernel: unpacking per
    /// tile of 4 rows cost a quarter of Gemma 3's prefill at 1 thread. Both give the int8
    /// blocks' bits.
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and what `D` needs.
    #[inline(always)]
    unsafe fn panels<D: DotU, const NV4: usize, const SPB: usize, S: BlockScale>(
        w: &Q5Blocks,
        scales: &[S],
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (n, k) = (w.n, w.k);
        let mut out = [0f32; 4 * Q5_PANEL];
        let o = out.as_mut_ptr();
        let mut unpacked = vec![0u8; if m >= 4 { Q5_PANEL * k } else { 0 }];
        // SAFETY: tiles of panels p < p1 and rows < m, columns in 0..32 (NV4 * 8 divides
        // 32), are inside `w`, `unpacked`, `x` and `out`; the copies write `cols` columns of
        // panel p of rows < m: inside y, in a panel this call owns.
        unsafe {
            for p in p0..p1 {
                let cols = Q5_PANEL.min(n - p * Q5_PANEL);
                if m < 4 {
                    for row in 0..m {
                        tile::<D, 1, 4, SPB, S>(w, scales, p, 0, x, row, o);
                        std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q5_PANEL), cols);
                    }
                    continue;
                }
                unpack::<D>(w, p, &mut unpacked);
                let panel = unpacked.as_ptr();
                let mut row = 0;
                while row + 4 <= m {
                    D::int8_rows::<4, NV4, SPB, S>(panel, k, scales, p, x, row, o);
                    for r in 0..4 {
                        std::ptr::copy_nonoverlapping(
                            o.add(r * Q5_PANEL),
                            y.add((row + r) * n + p * Q5_PANEL),
                            cols,
                        );
                    }
                    row += 4;
                }
                while row < m {
                    D::int8_rows::<1, 4, SPB, S>(panel, k, scales, p, x, row, o);
                    std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q5_PANEL), cols);
                    row += 1;
                }
            }
        }
    }

    /// Panel `p` as the int8 blocks hold a panel (`q + 128` per value), into `out` (32 * K).
    ///
    /// # Safety
    /// Panel `p` is inside `w`; the CPU has AVX2 and what `D` needs.
    #[inline(always)]
    unsafe fn unpack<D: DotU>(w: &Q5Blocks, p: usize, out: &mut [u8]) {
        let kb = w.k / QBLOCK;
        assert_eq!(out.len(), kb * QBLOCK * Q5_PANEL);
        // SAFETY: block b < K/32 of panel p is inside `w`; group g's 32 columns of block b are
        // inside `out` (1 KiB per block).
        unsafe {
            let nib = _mm256_set1_epi8(15);
            // q + 128 = u + lo + 128, in 1..=255.
            let bias = _mm256_set1_epi8((w.lo + 128) as u8 as i8);
            for b in 0..kb {
                let blk = w.bits.as_ptr().add((p * kb + b) * BLOCK_BYTES);
                let dst = out.as_mut_ptr().add(b * QBLOCK * Q5_PANEL);
                for g in 0..4 {
                    for octet in 0..4 {
                        let q = _mm256_loadu_si256(blk.add(g * 128 + octet * 32) as *const _);
                        let masks = blk.add(NIBBLE_BYTES + (g * 4 + octet) * 8) as *const u32;
                        let low = D::add_fifth_bits(_mm256_and_si256(q, nib), masks);
                        let high = D::add_fifth_bits(
                            _mm256_and_si256(_mm256_srli_epi16(q, 4), nib),
                            masks.add(1),
                        );
                        // Values 8g + t are the int8 blocks' group 2g, 8g + 4 + t group 2g + 1.
                        let at = |group: usize| dst.add(group * 128 + octet * 32) as *mut __m256i;
                        _mm256_storeu_si256(at(2 * g), _mm256_add_epi8(low, bias));
                        _mm256_storeu_si256(at(2 * g + 1), _mm256_add_epi8(high, bias));
                    }
                }
            }
        }
    }

    /// Rows `row..row + MR` by columns `c..c + 8 * NV` of panel `p`, over all of K, into `out`
    /// (`[MR][Q5_PANEL]`, at column c): the int8 blocks' tile on `u`, each scale's sum then
    /// corrected by `lo * sum(xq)`.
    ///
    /// # Safety
    /// Panel `p`, rows `row..row + MR` and columns `c..c + 8 * NV` <= 32 (c a multiple of 8)
    /// are inside `w`, `x` and `out`; the CPU has AVX2, FMA and what `D` needs.
    #[inline(always)]
    unsafe fn tile<D: DotU, const MR: usize, const NV: usize, const SPB: usize, S: BlockScale>(
        w: &Q5Blocks,
        scales: &[S],
        p: usize,
        c: usize,
        x: &QuantRows,
        row: usize,
        out: *mut f32,
    ) {
        let (k, kb) = (w.k, w.k / QBLOCK);
        let per = QBLOCK / SPB;
        // SAFETY: every offset stays in panel p's blocks (b < K/32) at columns c..c + 8 * NV,
        // in rows row..row + MR of x, and in out's MR rows: the caller's ranges.
        unsafe {
            let nib = _mm256_set1_epi8(15);
            let mut facc = [[_mm256_setzero_ps(); NV]; MR];
            for b in 0..kb {
                let blk = w.bits.as_ptr().add((p * kb + b) * BLOCK_BYTES);
                for h in 0..SPB {
                    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
                    for g in GROUPS_PER_SCALE[SPB] * h..GROUPS_PER_SCALE[SPB] * (h + 1) {
                        let mut xl = [_mm256_setzero_si256(); MR];
                        let mut xh = [_mm256_setzero_si256(); MR];
                        for r in 0..MR {
                            let xp = x.q.as_ptr().add((row + r) * k + b * QBLOCK + 8 * g);
                            xl[r] = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                            xh[r] = _mm256_set1_epi32((xp.add(4) as *const i32).read_unaligned());
                        }
                        for v in 0..NV {
                            let octet = c / 8 + v;
                            let q = _mm256_loadu_si256(blk.add(g * 128 + octet * 32) as *const _);
                            let masks = blk.add(NIBBLE_BYTES + (g * 4 + octet) * 8) as *const u32;
                            let low = D::add_fifth_bits(_mm256_and_si256(q, nib), masks);
                            let high = D::add_fifth_bits(
                                _mm256_and_si256(_mm256_srli_epi16(q, 4), nib),
                                masks.add(1),
                            );
                            for r in 0..MR {
                                acc[r][v] = D::dot(acc[r][v], low, xl[r]);
                                acc[r][v] = D::dot(acc[r][v], high, xh[r]);
                            }
                        }
                    }
                    let mut correction = [_mm256_setzero_si256(); MR];
                    for (r, corr) in correction.iter_mut().enumerate() {
                        let xq = x.q.as_ptr().add((row + r) * k + b * QBLOCK + per * h);
                        *corr =
                            _mm256_set1_epi32(w.lo * int_sum(std::slice::from_raw_parts(xq, per)));
                    }
                    let s = scales.as_ptr().add(scale_index::<SPB>(kb, p, b, h) + c);
                    for v in 0..NV {
                        let sc = S::load8(s.add(v * 8));
                        for r in 0..MR {
                            let xs = _mm256_set1_ps(*x.scale.get_unchecked((row + r) * kb + b));
                            let sums = _mm256_add_epi32(acc[r][v], correction[r]);
                            // Multiply, then add (no FMA), as the portable kernel.
                            facc[r][v] = _mm256_add_ps(
                                facc[r][v],
                                _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(sc, xs)),
                            );
                        }
                    }
                }
            }
            for r in 0..MR {
                for v in 0..NV {
                    _mm256_storeu_ps(out.add(r * Q5_PANEL + v * 8), facc[r][v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dispatch::{kernels, PanelKernels};
    use crate::kernels::q8_blocks::Q8Blocks;
    use crate::kernels::testing::{same_on_threads, Lcg, SHAPES};

    /// Int8 rows of values in `lo..lo + 32` (as two's complement bytes), scales per 16.
    fn rows(g: &mut Lcg, k: usize, n: usize, lo: i32) -> (Vec<u8>, Vec<f32>) {
        let rows = (0..k * n)
            .map(|_| (lo + (g.next() % 32) as i32) as i8 as u8)
            .collect();
        let scale = (0..n * k / HALF)
            .map(|_| (0.001 + g.f32().abs() * 0.01) * if g.next() % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        (rows, scale)
    }

    fn bits(y: &[f32]) -> Vec<u32> {
        y.iter().map(|v| v.to_bits()).collect()
    }

    /// Every kernel gives the bits of the int8 blocks' portable kernel on the same weight (so
    /// the same as every int8-block kernel), per 16 and per 32, for Q5_0's range (-16..16),
    /// Q5_1's (0..32) and one off both; with offsets too; and each weight is the same value.
    #[test]
    fn same_bits_as_int8_blocks() {
        for (i, (m, k, n)) in SHAPES.into_iter().enumerate() {
            for (per, lo) in [(QBLOCK, -16), (QBLOCK, 0), (HALF, -16), (HALF, -5)] {
                let mut g = Lcg((i * 131 + per) as u64 + lo as u64);
                let (rows, scale16) = rows(&mut g, k, n, lo);
                let scale: Vec<f32> = scale16.iter().step_by(per / HALF).copied().collect();
                let mut int8 = Q8Blocks::from_rows(k, n, rows.clone(), &scale, per).unwrap();
                let mut five = Q5Blocks::pack(k, n, &rows, &scale, per, false).unwrap();
                if i % 3 == 0 {
                    let offset: Vec<f32> = (0..n * k / per).map(|_| g.f32() * 0.1).collect();
                    int8 = int8.with_offsets(per, &offset).unwrap();
                    five = five.with_offsets(per, &offset).unwrap();
                }
                let how = [Activations::Q8_0, Activations::Q8K][i % 2];
                let (int8, five) = (int8.with_activations(how), five.with_activations(how));
                let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
                for c in 0..n {
                    int8.copy_column(c, &mut a);
                    five.copy_column(c, &mut b);
                    assert_eq!(bits(&a), bits(&b), "column {c}");
                }
                let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
                let xr = QuantRows::new(&x, m, k);
                let mut want = vec![f32::NAN; m * n];
                let panels = n.div_ceil(Q5_PANEL);
                // SAFETY: portable code; x holds m rows, y m x n.
                unsafe { int8.portable(&xr, m, want.as_mut_ptr(), 0, panels) };
                for (name, kernel) in kernels::<Q5Blocks>() {
                    let mut y = vec![f32::NAN; m * n];
                    // SAFETY: the kernel's CPU features were detected; x holds m rows, y m x n.
                    unsafe { kernel(&five, &xr, m, y.as_mut_ptr(), 0, panels) };
                    assert!(
                        bits(&y) == bits(&want),
                        "{name} per {per} lo {lo} m={m} k={k} n={n}"
                    );
                }
                let (mut y8, mut y5) = (vec![0f32; m * n], vec![0f32; m * n]);
                int8.matmul(&x, m, &mut y8);
                let one = same_on_threads(m * n, |y| five.matmul(&x, m, y));
                y5.copy_from_slice(&one);
                assert_eq!(
                    bits(&y5),
                    bits(&y8),
                    "matmul per {per} lo {lo} m={m} k={k} n={n}"
                );
            }
        }
    }

    /// Values spanning more than 32 integers stay in int8 blocks; the 5-bit weight is the size
    /// of GGUF's Q5_0 (5.5 bits a value with float16 scales).
    #[test]
    fn packs_only_what_5_bits_hold() {
        let (k, n) = (64, 40);
        let mut g = Lcg(3);
        let (mut rows, scale) = rows(&mut g, k, n, -16);
        let scale32: Vec<f32> = scale
            .iter()
            .step_by(2)
            .map(|&s| half::f16::from_f32(s).to_f32())
            .collect();
        let five = Q5Blocks::pack(k, n, &rows, &scale32, QBLOCK, false).unwrap();
        let panels = n.div_ceil(Q5_PANEL);
        assert_eq!(five.bits.len(), panels * (k / QBLOCK) * 640);
        assert!(matches!(five.scale, Scales::F16(_)));
        rows[7] = 16; // -16..=16: 33 integers
        assert!(Q5Blocks::pack(k, n, &rows, &scale32, QBLOCK, false).is_none());
        // Biased bytes (q + 128), as 8-bit MatMulNBits stores Q5_0.
        let biased: Vec<u8> = rows.iter().map(|&b| (b as i8 as i32 + 128) as u8).collect();
        assert!(Q5Blocks::pack(k, n, &biased, &scale32, QBLOCK, true).is_none());
        rows[7] = 15;
        let biased: Vec<u8> = rows.iter().map(|&b| (b as i8 as i32 + 128) as u8).collect();
        let a = Q5Blocks::pack(k, n, &biased, &scale32, QBLOCK, true).unwrap();
        let b = Q5Blocks::pack(k, n, &rows, &scale32, QBLOCK, false).unwrap();
        assert_eq!(a.bits, b.bits);
        assert_eq!(a.lo, b.lo);
    }
}
