//! Matrix products against int8 weights in blocks of 16 along K, each block with its own f32
//! scale: a weight is `s * q`, `q` in -127..=127. That holds exactly what GGUF's 8-, 6- and 5-bit
//! types store: Q8_0 (`d * q`, blocks of 32: two blocks with one scale), Q5_0 (`d * (q - 16)`)
//! Q6_K (`d * sc * (q - 32)`, a 16-value block's `d * sc` an exact f32 product) and Q3_K
//! (`d * (sc - 32) * q`). With [`BlockOffsets`] (`s * q + o`), Q5_1 (`d * q + m`), Q5_K and
//! Q2_K (`d * sc * q - dmin * m`).
//!
//! Activations are rounded to 8 bits per block of 32, as for the Q4_1 product
//! ([`super::quantize`]): the values of a block that share a scale (a 16-value half, or the
//! whole block when the file has one scale per 32, as llama.cpp's Q8_0 product sums it) are an
//! exact integer dot product, `y[n] += sum(q * xq) * (s * xs)`, in order.
//!
//! Layout: the Q8 head's ([`super::q8`]): panels of 32 columns; per (panel, block of 32 K
//! values), 8 groups of 4 K values, in a group 4 bytes per column (one 32-bit lane), each value
//! stored as `q + 128` (the unsigned operand `vpdpbusd` wants). Groups 0..4 are the first
//! half-block, 4..8 the second. Scales by (panel, half-block, column), or by (panel, block,
//! column) when the file has one per 32 (Q8_0, Q5_0): both halves then read the same scale, so
//! the products are the same bits at half the scales' memory (21 MB less for Gemma 3's table).
//! Scales that are all float16 values (Q8_0 and Q5_0 store them so) are held as float16 and
//! widened exactly in the kernels: half the bytes again (10.6 MB for Gemma 3's table, and 5% of
//! the bytes its decode reads per token).

use half::f16;

use super::dispatch::panel_kernels;
use super::offsets::BlockOffsets;
use super::q4_1::{BlockScale, QBLOCK};
use super::quantize::{Activations, QuantRows};

/// Values per scale along K.
pub const HALF: usize = 16;
/// Columns per panel.
pub const Q8B_PANEL: usize = 32;
/// Bytes of one (panel, block of 32).
const BLOCK_BYTES: usize = Q8B_PANEL * QBLOCK;

/// An int8 weight `[K, N]` (K a multiple of 32) with a scale per 16 values, packed.
pub struct Q8Blocks {
    pub k: usize,
    pub n: usize,
    q: Vec<u8>,
    /// By (panel, half-block, column), or (panel, block, column) when `per` is 32; padded
    /// columns 0.
    scale: Scales,
    /// Scales per block of 32 along K: 2 (one per 16 values) or 1.
    scales_per_block: usize,
    /// How its products round activations.
    activations: Activations,
    /// Per-block offsets, added after the kernels' integer products.
    offsets: Option<BlockOffsets>,
}

/// A weight's scales, as f32 or, when each is a float16 value, as float16.
pub(crate) enum Scales {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Scales {
    /// `scale` `[N][K/per]` by (panel of 32 columns, block, column), padded columns 0: as
    /// float16 when that holds every value exactly (bit for bit), else as f32. Built in one
    /// pass, so that a 262k-row table's scales are not held a second time as f32 on the way.
    pub(crate) fn in_panels(scale: &[f32], n: usize, blocks: usize) -> Scales {
        let exact = |v: &f32| f16::from_f32(*v).to_f32().to_bits() == v.to_bits();
        let len = n.div_ceil(Q8B_PANEL) * blocks * Q8B_PANEL;
        // Where output channel c's block b goes.
        let at = |c: usize, b: usize| ((c / Q8B_PANEL) * blocks + b) * Q8B_PANEL + c % Q8B_PANEL;
        let fill = |out: &mut dyn FnMut(usize, f32)| {
            for c in 0..n {
                for b in 0..blocks {
                    out(at(c, b), scale[c * blocks + b]);
                }
            }
        };
        if scale.iter().all(exact) {
            let mut s = vec![f16::ZERO; len];
            fill(&mut |i, v| s[i] = f16::from_f32(v));
            Scales::F16(s)
        } else {
            let mut s = vec![0f32; len];
            fill(&mut |i, v| s[i] = v);
            Scales::F32(s)
        }
    }

    #[inline(always)]
    pub(crate) fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F32(s) => s[i],
            Scales::F16(s) => s[i].to_f32(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        match self {
            Scales::F32(s) => s.len(),
            Scales::F16(s) => s.len(),
        }
    }
}

/// `with_scales!(w, f, [A, B,], (args))` calls `f::<A, B, SPB, S>(w, scales: &[S], args)` for
/// the weight's scales per block (SPB, 1 or 2) and their type (S, f32 or float16): the kernels
/// take both as constants. (Also for [`super::q5_blocks::Q5Blocks`], whose fields have the same
/// names.)
macro_rules! with_scales {
    ($w:expr, $f:ident, [$($c:tt)*], ($($arg:expr),*)) => {
        match (&$w.scale, $w.scales_per_block) {
            ($crate::kernels::q8_blocks::Scales::F32(s), 1) => $f::<$($c)* 1, f32>($w, s, $($arg),*),
            ($crate::kernels::q8_blocks::Scales::F32(s), _) => $f::<$($c)* 2, f32>($w, s, $($arg),*),
            ($crate::kernels::q8_blocks::Scales::F16(s), 1) => $f::<$($c)* 1, ::half::f16>($w, s, $($arg),*),
            ($crate::kernels::q8_blocks::Scales::F16(s), _) => $f::<$($c)* 2, ::half::f16>($w, s, $($arg),*),
        }
    };
}
pub(crate) use with_scales;

impl std::fmt::Debug for Q8Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Blocks {{ k: {}, n: {}", self.k, self.n)?;
        if let Some(o) = &self.offsets {
            write!(f, ", offsets per {}", o.per())?;
        }
        write!(f, " }}")
    }
}

impl Q8Blocks {
    /// From `rows` `[N][K]` of int8 values (as bytes, two's complement) and `scale` `[N][K/per]`
    /// (tests; the loader checks, then packs with [`Q8Blocks::from_checked`]).
    #[cfg(test)]
    pub(crate) fn from_rows(
        k: usize,
        n: usize,
        rows: Vec<u8>,
        scale: &[f32],
        per: usize,
    ) -> Result<Q8Blocks, String> {
        Self::check(k, n, &rows, scale, per, false)?;
        Ok(Self::from_checked(k, n, rows, scale, per, false))
    }

    /// Whether `bytes` `[N][K]`, int8 values in -127..=127 (two's complement, or stored as
    /// `q + 128` when `biased`: 8-bit `MatMulNBits`' bytes with its default zero point; the AVX2
    /// kernel negates weights, and no GGUF type stores -128), and `scale` `[N][K/per]`, `per` 16
    /// or 32, can be packed: checked before a caller gives its bytes to
    /// [`Q8Blocks::from_checked`], so that it keeps them when they cannot be.
    pub fn check(
        k: usize,
        n: usize,
        bytes: &[u8],
        scale: &[f32],
        per: usize,
        biased: bool,
    ) -> Result<(), String> {
        if k == 0
            || n == 0
            || k % QBLOCK != 0
            || !(per == HALF || per == QBLOCK)
            || bytes.len() != k * n
            || scale.len() != n * k / per
        {
            return Err(format!(
                "int8 block weight of {} values and {} scales for K={k} N={n}",
                bytes.len(),
                scale.len()
            ));
        }
        // q = -128 is `q + 128` = 0.
        if bytes.contains(&if biased { 0 } else { 0x80 }) {
            return Err("int8 block weight with a value of -128 (the range is -127..=127)".into());
        }
        Ok(())
    }

    /// Packs `bytes` that [`Q8Blocks::check`] accepted (two's complement, or `q + 128` when
    /// `biased`) into `q + 128`, the panels' form. In place: a panel's 32 columns are 32
    /// consecutive rows of `bytes` and fill the same number of bytes, so each panel is
    /// rearranged within its own bytes, and a 262k-row table is never held twice while it loads.
    pub(crate) fn from_checked(
        k: usize,
        n: usize,
        mut bytes: Vec<u8>,
        scale: &[f32],
        per: usize,
        biased: bool,
    ) -> Q8Blocks {
        let flip = if biased { 0 } else { 0x80 };
        let (panels, halves) = (n.div_ceil(Q8B_PANEL), k / per);
        // Padding columns hold q = 0.
        bytes.resize(panels * Q8B_PANEL * k, 0x80 ^ flip);
        let flip4 = u32::from_ne_bytes([flip; 4]);
        let mut rows = vec![0u8; Q8B_PANEL * k];
        for panel in bytes.chunks_exact_mut(Q8B_PANEL * k) {
            rows.copy_from_slice(panel);
            for (j, row) in rows.chunks_exact(k).enumerate() {
                // 4 consecutive K values of a column are 4 consecutive bytes in a panel.
                for (g, four) in row.chunks_exact(4).enumerate() {
                    let (b, r) = (4 * g / QBLOCK, 4 * g % QBLOCK);
                    let at = b * BLOCK_BYTES + (r / 4) * (Q8B_PANEL * 4) + j * 4;
                    let v = u32::from_ne_bytes(four.try_into().unwrap()) ^ flip4;
                    panel[at..at + 4].copy_from_slice(&v.to_ne_bytes());
                }
            }
        }
        Q8Blocks {
            k,
            n,
            q: bytes,
            scale: Scales::in_panels(scale, n, halves),
            scales_per_block: QBLOCK / per,
            activations: Activations::default(),
            offsets: None,
        }
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
        Q8Blocks {
            offsets: Some(offsets),
            ..self
        }
    }

    /// The same weight, its products rounding activations as `activations` says.
    pub fn with_activations(self, activations: Activations) -> Self {
        Q8Blocks {
            activations,
            ..self
        }
    }

    /// Where the scales of panel `p`, block `b`, half `h` start (32 columns of them).
    #[inline(always)]
    fn scales_at(&self, p: usize, b: usize, h: usize) -> usize {
        match self.scales_per_block {
            1 => scale_index::<1>(self.k / QBLOCK, p, b, h),
            _ => scale_index::<2>(self.k / QBLOCK, p, b, h),
        }
    }

    /// Output channel `c`'s K values, `s * q` (a tied embedding's row, exactly as the file's).
    pub fn copy_column(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k);
        let (p, j) = (c / Q8B_PANEL, c % Q8B_PANEL);
        let panel = &self.q[p * Q8B_PANEL * self.k..];
        for (kk, o) in out.iter_mut().enumerate() {
            let (b, r) = (kk / QBLOCK, kk % QBLOCK);
            let byte = panel[b * BLOCK_BYTES + (r / 4) * (Q8B_PANEL * 4) + j * 4 + r % 4];
            let s = self.scale.get(self.scales_at(p, b, r / HALF) + j);
            *o = self.plus_offset(s * (byte ^ 0x80) as i8 as f32, kk, c);
        }
    }

    /// The weight's value at (k, column c), as the kernels multiply it (tests).
    #[cfg(test)]
    fn value(&self, kk: usize, c: usize) -> f32 {
        let (p, j) = (c / Q8B_PANEL, c % Q8B_PANEL);
        let (b, r) = (kk / QBLOCK, kk % QBLOCK);
        let byte = self.q
            [p * Q8B_PANEL * self.k + b * BLOCK_BYTES + (r / 4) * (Q8B_PANEL * 4) + j * 4 + r % 4];
        let s = self.scale.get(self.scales_at(p, b, r / HALF) + j);
        self.plus_offset(s * (byte ^ 0x80) as i8 as f32, kk, c)
    }

    /// `v` plus the offset at (k, column c), if the weight has offsets.
    fn plus_offset(&self, v: f32, kk: usize, c: usize) -> f32 {
        match &self.offsets {
            Some(o) => v + o.at(self.k, c, kk),
            None => v,
        }
    }
}

/// Groups of 4 K values per scale, by scales per block of 32 (1 or 2): the kernels sum a
/// scale's values as one integer dot product before they multiply it.
const GROUPS_PER_SCALE: [usize; 3] = [0, 8, 4];

/// [`Q8Blocks::scales_at`] for `SPB` scales per block of 32, `kb` blocks per panel column: the
/// SIMD kernels take `SPB` as a constant (a run-time multiply per half-block cost a tenth of the
/// decode of Gemma 3's LM head).
#[inline(always)]
pub(crate) fn scale_index<const SPB: usize>(kb: usize, p: usize, b: usize, h: usize) -> usize {
    (p * SPB * kb + SPB * b + h * (SPB - 1)) * Q8B_PANEL
}

panel_kernels!(Q8Blocks, Q8B_PANEL, offsets);

mod portable {
    use super::*;

    /// The order of operations every kernel follows, rounding for rounding.
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels(w: &Q8Blocks, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
        // SAFETY: the caller's contract, passed on.
        unsafe { with_scales!(w, panels_with, [], (x, m, y, p0, p1)) }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`; `scales` are `w`'s.
    unsafe fn panels_with<const SPB: usize, S: BlockScale>(
        w: &Q8Blocks,
        scales: &[S],
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        for p in p0..p1 {
            let panel = &w.q[p * Q8B_PANEL * k..(p + 1) * Q8B_PANEL * k];
            for row in 0..m {
                let mut facc = [0f32; Q8B_PANEL];
                for b in 0..kb {
                    let blk = &panel[b * BLOCK_BYTES..][..BLOCK_BYTES];
                    let xq = &x.q[row * k + b * QBLOCK..][..QBLOCK];
                    let xs = x.scale[row * kb + b];
                    for h in 0..SPB {
                        let s = &scales[scale_index::<SPB>(kb, p, b, h)..][..Q8B_PANEL];
                        for (j, f) in facc.iter_mut().enumerate() {
                            let mut acc = 0i32;
                            for g in GROUPS_PER_SCALE[SPB] * h..GROUPS_PER_SCALE[SPB] * (h + 1) {
                                for t in 0..4 {
                                    let v = blk[g * Q8B_PANEL * 4 + j * 4 + t] as i32 - 128;
                                    acc += v * xq[4 * g + t] as i32;
                                }
                            }
                            *f += acc as f32 * (s[j].to_f32() * xs);
                        }
                    }
                }
                for (j, v) in facc[..Q8B_PANEL.min(n - p * Q8B_PANEL)].iter().enumerate() {
                    // SAFETY: row < m and column p * 32 + j < N, of a panel this call owns.
                    unsafe { *y.add(row * n + p * Q8B_PANEL + j) = *v };
                }
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use std::arch::wasm32::*;

    use super::*;
    use crate::kernels::quantize::int_sum;
    use crate::kernels::quantize::wasm::i8x4_twice;

    /// Rows computed together: each block's bytes are widened once for all of them.
    const TILE: usize = 4;

    /// # Safety
    /// As `dispatch::PanelKernels`.
    pub unsafe fn panels(w: &Q8Blocks, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
        // Per row, block and scale: 128 * the sum of the x values the scale covers.
        let per = QBLOCK / w.scales_per_block;
        let bias: Vec<i32> = x.q[..m * w.k]
            .chunks_exact(per)
            .map(|xs| 128 * int_sum(xs))
            .collect();
        // SAFETY: the caller's contract, passed on; every tile's rows are below m.
        unsafe {
            for p in p0..p1 {
                let mut row = 0;
                while row + TILE <= m {
                    with_scales!(w, tile, [TILE,], (x, &bias, p, row, y));
                    row += TILE;
                }
                while row < m {
                    with_scales!(w, tile, [1,], (x, &bias, p, row, y));
                    row += 1;
                }
            }
        }
    }

    /// Panel `p` for rows `row0 .. row0 + R`, each row's arithmetic that of the portable kernel.
    /// The stored bytes `q + 128` are multiplied as they are, and each block sum corrected by
    /// `bias`, `128 * sum(x)` over its values: the same integers, two operations fewer per 16
    /// bytes.
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`, for panel p < p1 and rows `row0 .. row0 + R` < m.
    #[inline(always)]
    unsafe fn tile<const R: usize, const SPB: usize, S: BlockScale>(
        w: &Q8Blocks,
        scales: &[S],
        x: &QuantRows,
        bias: &[i32],
        p: usize,
        row0: usize,
        y: *mut f32,
    ) {
        let (k, n, kb) = (w.k, w.n, w.k / QBLOCK);
        let mut facc = [[f32x4_splat(0.0); Q8B_PANEL / 4]; R];
        // SAFETY: for b < K/32 the block's 1 KiB and its 64 scales are inside `w`; for the
        // tile's rows, their 32 quantized values and scale are inside `x`, and columns
        // p * 32 .. p * 32 + cols of their outputs are inside y, in a panel this call owns.
        unsafe {
            for b in 0..kb {
                let blk = w.q.as_ptr().add(p * Q8B_PANEL * k + b * BLOCK_BYTES);
                let mut xw = [[i32x4_splat(0); 8]; R];
                for (r, xw) in xw.iter_mut().enumerate() {
                    let xq = x.q.as_ptr().add((row0 + r) * k + b * QBLOCK);
                    for (g, xw) in xw.iter_mut().enumerate() {
                        *xw = i8x4_twice(xq.add(4 * g));
                    }
                }
                for h in 0..SPB {
                    let s = scales.as_ptr().add(scale_index::<SPB>(kb, p, b, h));
                    for c4 in 0..Q8B_PANEL / 4 {
                        let mut acc = [[i32x4_splat(0); 2]; R];
                        for g in GROUPS_PER_SCALE[SPB] * h..GROUPS_PER_SCALE[SPB] * (h + 1) {
                            let v = v128_load(blk.add(g * Q8B_PANEL * 4 + c4 * 16) as *const v128);
                            let lo = u16x8_extend_low_u8x16(v);
                            let hi = u16x8_extend_high_u8x16(v);
                            for (acc, xw) in acc.iter_mut().zip(&xw) {
                                acc[0] = i32x4_add(acc[0], i32x4_dot_i16x8(lo, xw[g]));
                                acc[1] = i32x4_add(acc[1], i32x4_dot_i16x8(hi, xw[g]));
                            }
                        }
                        let sc = S::load4(s.add(c4 * 4));
                        for (r, acc) in acc.iter().enumerate() {
                            let xs = f32x4_splat(x.scale[(row0 + r) * kb + b]);
                            let sums = i32x4_sub(
                                i32x4_add(
                                    i32x4_shuffle::<0, 2, 4, 6>(acc[0], acc[1]),
                                    i32x4_shuffle::<1, 3, 5, 7>(acc[0], acc[1]),
                                ),
                                i32x4_splat(bias[((row0 + r) * kb + b) * SPB + h]),
                            );
                            facc[r][c4] = f32x4_add(
                                facc[r][c4],
                                f32x4_mul(f32x4_convert_i32x4(sums), f32x4_mul(sc, xs)),
                            );
                        }
                    }
                }
            }
            let cols = Q8B_PANEL.min(n - p * Q8B_PANEL);
            let mut out = [0f32; Q8B_PANEL];
            for (r, facc) in facc.iter().enumerate() {
                for (c4, f) in facc.iter().enumerate() {
                    v128_store(out.as_mut_ptr().add(c4 * 4) as *mut v128, *f);
                }
                let dst = y.add((row0 + r) * n + p * Q8B_PANEL);
                std::ptr::copy_nonoverlapping(out.as_ptr(), dst, cols);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    // The Q8 head's byte dot products: the same stored `q + 128` bytes.
    use crate::kernels::q8::x86::dot_avx2;
    use crate::kernels::quantize::int_sum;

    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA, F16C and AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn panels_vnni(
        w: &Q8Blocks,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // SAFETY: the caller's contract; this function has the features `tile512` needs.
        unsafe { with_scales!(w, panels512, [], (x, m, y, p0, p1)) }
    }

    /// [`panels`] on 512-bit vectors ([`tile512`]).
    ///
    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX-512 F, BW and VNNI, and F16C.
    #[inline(always)]
    unsafe fn panels512<const SPB: usize, S: BlockScale>(
        w: &Q8Blocks,
        scales: &[S],
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let n = w.n;
        let mut out = [0f32; 4 * Q8B_PANEL];
        let o = out.as_mut_ptr();
        // SAFETY: panels p < p1 and rows < m are inside `w`, `x` and `out`; the copies write
        // `cols` columns of panel p of rows < m: inside y, in a panel this call owns.
        unsafe {
            for p in p0..p1 {
                let cols = Q8B_PANEL.min(n - p * Q8B_PANEL);
                let panel = w.q.as_ptr().add(p * Q8B_PANEL * w.k);
                let mut row = 0;
                while row + 4 <= m {
                    tile512::<4, SPB, S>(panel, w.k, scales, p, x, row, o);
                    for r in 0..4 {
                        std::ptr::copy_nonoverlapping(
                            o.add(r * Q8B_PANEL),
                            y.add((row + r) * n + p * Q8B_PANEL),
                            cols,
                        );
                    }
                    row += 4;
                }
                while row < m {
                    tile512::<1, SPB, S>(panel, w.k, scales, p, x, row, o);
                    std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q8B_PANEL), cols);
                    row += 1;
                }
            }
        }
    }

    /// [`tile`] on 512-bit vectors, for AVX-512 VNNI: rows `row..row + MR` by the whole panel
    /// `p` (two vectors of 16 columns). Each lane does what a lane of [`tile`] does, in the same
    /// order: the same bits, with half the instructions.
    ///
    /// # Safety
    /// Panel `p` and rows `row..row + MR` are inside `panel`, `scales`, `x` and `out`; the CPU
    /// has AVX-512 F, BW and VNNI, and F16C.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) unsafe fn tile512<const MR: usize, const SPB: usize, S: BlockScale>(
        panel: *const u8,
        k: usize,
        scales: &[S],
        p: usize,
        x: &QuantRows,
        row: usize,
        out: *mut f32,
    ) {
        let kb = k / QBLOCK;
        // SAFETY: every offset stays in panel p's blocks (b < K/32), in rows row..row + MR of
        // x, and in out's MR rows: the caller's ranges.
        unsafe {
            let mut facc = [[_mm512_setzero_ps(); 2]; MR];
            for b in 0..kb {
                let blk = panel.add(b * BLOCK_BYTES);
                for h in 0..SPB {
                    let mut acc = [[_mm512_setzero_si512(); 2]; MR];
                    // One row sums odd groups apart: twice the chains of dependent
                    // `vpdpbusd`, half as long (integer sums: the same bits in any order).
                    let mut acc_odd = [[_mm512_setzero_si512(); 2]; MR];
                    for g in GROUPS_PER_SCALE[SPB] * h..GROUPS_PER_SCALE[SPB] * (h + 1) {
                        let mut xa = [_mm512_setzero_si512(); MR];
                        for (r, xa) in xa.iter_mut().enumerate() {
                            let xp = x.q.as_ptr().add((row + r) * k + b * QBLOCK + 4 * g);
                            *xa = _mm512_set1_epi32((xp as *const i32).read_unaligned());
                        }
                        for v in 0..2 {
                            let wv = _mm512_loadu_si512(
                                blk.add(g * Q8B_PANEL * 4 + v * 64) as *const __m512i
                            );
                            for r in 0..MR {
                                if MR == 1 && g % 2 == 1 {
                                    acc_odd[r][v] = _mm512_dpbusd_epi32(acc_odd[r][v], wv, xa[r]);
                                } else {
                                    acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], wv, xa[r]);
                                }
                            }
                        }
                    }
                    let mut correction = [_mm512_setzero_si512(); MR];
                    for (r, corr) in correction.iter_mut().enumerate() {
                        let per = QBLOCK / SPB;
                        let xq = x.q.as_ptr().add((row + r) * k + b * QBLOCK + per * h);
                        *corr =
                            _mm512_set1_epi32(128 * int_sum(std::slice::from_raw_parts(xq, per)));
                    }
                    let s = scales.as_ptr().add(scale_index::<SPB>(kb, p, b, h));
                    for v in 0..2 {
                        let sc = S::load16(s.add(v * 16));
                        for r in 0..MR {
                            let xs = _mm512_set1_ps(*x.scale.get_unchecked((row + r) * kb + b));
                            let mut sums = acc[r][v];
                            if MR == 1 {
                                sums = _mm512_add_epi32(sums, acc_odd[r][v]);
                            }
                            let sums = _mm512_sub_epi32(sums, correction[r]);
                            // Multiply, then add (no FMA), as the portable kernel.
                            facc[r][v] = _mm512_add_ps(
                                facc[r][v],
                                _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(sc, xs)),
                            );
                        }
                    }
                }
            }
            for r in 0..MR {
                for v in 0..2 {
                    _mm512_storeu_ps(out.add(r * Q8B_PANEL + v * 16), facc[r][v]);
                }
            }
        }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panels_avx2(
        w: &Q8Blocks,
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        // 16 vector registers: 4 rows x 16 columns of accumulators at a time.
        // SAFETY: the caller's contract; this function has the features `panels` needs.
        unsafe { with_scales!(w, panels, [2,], (x, m, y, p0, p1)) }
    }

    /// # Safety
    /// As `dispatch::PanelKernels`, on a CPU with AVX2, FMA and F16C.
    #[inline(always)]
    unsafe fn panels<const NV4: usize, const SPB: usize, S: BlockScale>(
        w: &Q8Blocks,
        scales: &[S],
        x: &QuantRows,
        m: usize,
        y: *mut f32,
        p0: usize,
        p1: usize,
    ) {
        let n = w.n;
        let mut out = [0f32; 4 * Q8B_PANEL];
        let o = out.as_mut_ptr();
        // SAFETY: tiles of panels p < p1 and rows < m, columns in 0..32 (NV4 * 8 divides
        // 32), are inside `w`, `x` and `out`; the copies write `cols` columns of panel p of
        // rows < m: inside y, in a panel this call owns.
        unsafe {
            for p in p0..p1 {
                let cols = Q8B_PANEL.min(n - p * Q8B_PANEL);
                let panel = w.q.as_ptr().add(p * Q8B_PANEL * w.k);
                let mut row = 0;
                while row + 4 <= m {
                    for c in (0..Q8B_PANEL).step_by(8 * NV4) {
                        tile::<4, NV4, SPB, S>(panel, w.k, scales, p, c, x, row, o.add(c));
                    }
                    for r in 0..4 {
                        std::ptr::copy_nonoverlapping(
                            o.add(r * Q8B_PANEL),
                            y.add((row + r) * n + p * Q8B_PANEL),
                            cols,
                        );
                    }
                    row += 4;
                }
                while row < m {
                    tile::<1, 4, SPB, S>(panel, w.k, scales, p, 0, x, row, o);
                    std::ptr::copy_nonoverlapping(o, y.add(row * n + p * Q8B_PANEL), cols);
                    row += 1;
                }
            }
        }
    }

    /// Rows `row..row + MR` by columns `c..c + 8 * NV` of panel `p` (its `32 * k` bytes at
    /// `panel`, laid out as [`Q8Blocks`] lays a panel out; its scales in `scales`), over all of
    /// K, into `out` (`[MR][Q8B_PANEL]`, at column c).
    ///
    /// # Safety
    /// Panel `p`, rows `row..row + MR` and columns `c..c + 8 * NV` <= 32 are inside `panel`,
    /// `scales`, `x` and `out`; the CPU has AVX2, FMA and F16C.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) unsafe fn tile<const MR: usize, const NV: usize, const SPB: usize, S: BlockScale>(
        panel: *const u8,
        k: usize,
        scales: &[S],
        p: usize,
        c: usize,
        x: &QuantRows,
        row: usize,
        out: *mut f32,
    ) {
        let kb = k / QBLOCK;
        // SAFETY: every offset stays in panel p's blocks (b < K/32) at columns c..c + 8 * NV,
        // in rows row..row + MR of x, and in out's MR rows: the caller's ranges.
        unsafe {
            let mut facc = [[_mm256_setzero_ps(); NV]; MR];
            for b in 0..kb {
                let blk = panel.add(b * BLOCK_BYTES + c * 4);
                for h in 0..SPB {
                    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
                    for g in GROUPS_PER_SCALE[SPB] * h..GROUPS_PER_SCALE[SPB] * (h + 1) {
                        let mut xa = [_mm256_setzero_si256(); MR];
                        let mut xa_abs = [_mm256_setzero_si256(); MR];
                        for r in 0..MR {
                            let xp = x.q.as_ptr().add((row + r) * k + b * QBLOCK + 4 * g);
                            xa[r] = _mm256_set1_epi32((xp as *const i32).read_unaligned());
                            xa_abs[r] = _mm256_abs_epi8(xa[r]);
                        }
                        for v in 0..NV {
                            let wv = _mm256_loadu_si256(
                                blk.add(g * Q8B_PANEL * 4 + v * 32) as *const __m256i
                            );
                            for r in 0..MR {
                                acc[r][v] = dot_avx2(acc[r][v], wv, xa[r], xa_abs[r]);
                            }
                        }
                    }
                    let s = scales.as_ptr().add(scale_index::<SPB>(kb, p, b, h) + c);
                    for v in 0..NV {
                        let sc = S::load8(s.add(v * 8));
                        for r in 0..MR {
                            let xs = _mm256_set1_ps(*x.scale.get_unchecked((row + r) * kb + b));
                            // Multiply, then add (no FMA), as the portable kernel.
                            facc[r][v] = _mm256_add_ps(
                                facc[r][v],
                                _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][v]), _mm256_mul_ps(sc, xs)),
                            );
                        }
                    }
                }
            }
            for r in 0..MR {
                for v in 0..NV {
                    _mm256_storeu_ps(out.add(r * Q8B_PANEL + v * 8), facc[r][v]);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::dispatch::{kernels, PanelKernels};
    use crate::kernels::testing::{same_on_threads, Lcg, SHAPES};

    /// Int8 rows (the whole range, -127..=127) with a scale per 16 values.
    pub(crate) fn weights(g: &mut Lcg, k: usize, n: usize) -> (Vec<u8>, Vec<f32>, Q8Blocks) {
        let rows: Vec<u8> = (0..k * n)
            .map(|_| g.i8())
            .map(|b| if b == 0x80 { 0x81 } else { b })
            .collect();
        let scale: Vec<f32> = (0..n * k / HALF)
            .map(|_| (0.001 + g.f32().abs() * 0.01) * if g.next() % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let w = Q8Blocks::from_rows(k, n, rows.clone(), &scale, HALF).unwrap();
        (rows, scale, w)
    }

    #[test]
    fn holds_every_weight_exactly() {
        let (k, n) = (96, 70);
        let (rows, scale, w) = weights(&mut Lcg(1), k, n);
        let mut row = vec![0f32; k];
        for c in 0..n {
            w.copy_column(c, &mut row);
            for kk in 0..k {
                let want = scale[c * k / HALF + kk / HALF] * rows[c * k + kk] as i8 as f32;
                assert_eq!(w.value(kk, c).to_bits(), want.to_bits(), "({kk}, {c})");
                assert_eq!(row[kk].to_bits(), want.to_bits(), "row {c} at {kk}");
            }
        }
    }

    /// A scale per 32 (Q8_0, Q5_0) is held once, not twice: the same weights, half the scales
    /// (the kernels sum the whole block before they multiply its scale: checked against the
    /// reference in `q8_blocks_match_reference_and_each_other`).
    #[test]
    fn a_scale_per_32_is_held_once() {
        for (_, k, n) in SHAPES {
            let mut g = Lcg((k * 5 + n) as u64);
            let (rows, scale16, _) = weights(&mut g, k, n);
            let scale32: Vec<f32> = scale16.iter().step_by(2).copied().collect();
            let twice: Vec<f32> = scale32.iter().flat_map(|&s| [s, s]).collect();
            let per16 = Q8Blocks::from_rows(k, n, rows.clone(), &twice, HALF).unwrap();
            let per32 = Q8Blocks::from_rows(k, n, rows, &scale32, QBLOCK).unwrap();
            assert_eq!(per32.scale.len() * 2, per16.scale.len());
            let (mut r16, mut r32) = (vec![0f32; k], vec![0f32; k]);
            for c in 0..n {
                per16.copy_column(c, &mut r16);
                per32.copy_column(c, &mut r32);
                assert_eq!(r16, r32, "column {c}");
            }
        }
        assert!(Q8Blocks::from_rows(32, 1, vec![0; 32], &[1.0; 2], QBLOCK).is_err());
        assert!(Q8Blocks::from_rows(32, 1, vec![0; 32], &[1.0; 4], 8).is_err());
    }

    /// Scales that are float16 values (Q8_0, Q5_0) are held as float16, and every kernel gives
    /// the bits it gives with the same scales held as f32, per 16 and per 32.
    #[test]
    fn float16_scales_give_the_bits_of_the_same_scales_as_f32() {
        for (m, k, n) in SHAPES {
            for per in [HALF, QBLOCK] {
                let mut g = Lcg((m * 31 + k * 7 + n + per) as u64);
                let (rows, scale16, _) = weights(&mut g, k, n);
                let scale: Vec<f32> = scale16
                    .iter()
                    .step_by(per / HALF)
                    .map(|&s| f16::from_f32(s).to_f32())
                    .collect();
                let half = Q8Blocks::from_rows(k, n, rows.clone(), &scale, per).unwrap();
                let Scales::F16(held) = &half.scale else {
                    panic!("float16 values held as f32")
                };
                let mut full = Q8Blocks::from_rows(k, n, rows, &scale, per).unwrap();
                full.scale = Scales::F32(held.iter().map(|s| s.to_f32()).collect());
                let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
                let xr = QuantRows::new(&x, m, k);
                for (name, kernel) in kernels::<Q8Blocks>() {
                    let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    // SAFETY: the kernel's CPU features were detected; x holds m rows, y m x n.
                    unsafe {
                        kernel(&half, &xr, m, a.as_mut_ptr(), 0, n.div_ceil(Q8B_PANEL));
                        kernel(&full, &xr, m, b.as_mut_ptr(), 0, n.div_ceil(Q8B_PANEL));
                    }
                    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert!(bits(&a) == bits(&b), "{name} per {per} m={m} k={k} n={n}");
                }
                let (mut r16, mut r32) = (vec![0f32; k], vec![0f32; k]);
                for c in 0..n {
                    half.copy_column(c, &mut r16);
                    full.copy_column(c, &mut r32);
                    assert_eq!(r16, r32, "column {c}");
                }
            }
        }
        // One scale that float16 cannot hold keeps them all f32.
        let w = Q8Blocks::from_rows(32, 2, vec![1; 64], &[0.5, 1.0 + f32::EPSILON], QBLOCK);
        assert!(matches!(w.unwrap().scale, Scales::F32(_)));
    }

    /// Every kernel against the f64 product with x rounded as the kernels round it, and every
    /// kernel's bits equal to the portable kernel's (listed first), at every shape.
    #[test]
    fn q8_blocks_match_reference_and_each_other() {
        for ((m, k, n), per) in SHAPES.into_iter().flat_map(|s| [(s, HALF), (s, QBLOCK)]) {
            let mut g = Lcg((m * 1000 + k * 10 + n + per) as u64);
            let (rows, scale, w) = weights(&mut g, k, n);
            let w = if per == HALF {
                w
            } else {
                let scale32: Vec<f32> = scale.iter().step_by(2).copied().collect();
                Q8Blocks::from_rows(k, n, rows, &scale32, QBLOCK).unwrap()
            };
            let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
            let xr = QuantRows::new(&x, m, k);
            let reference: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k)
                        .map(|kk| {
                            w.value(kk, c) as f64
                                * xr.q[r * k + kk] as f64
                                * xr.scale[(r * k + kk) / QBLOCK] as f64
                        })
                        .sum()
                })
                .collect();
            let mut portable: Option<Vec<u32>> = None;
            for (name, kernel) in kernels::<Q8Blocks>() {
                let mut y = vec![f32::NAN; m * n];
                // SAFETY: the kernel's CPU features were detected; x holds m rows, y m x n.
                unsafe { kernel(&w, &xr, m, y.as_mut_ptr(), 0, n.div_ceil(Q8B_PANEL)) };
                for (i, (a, b)) in y.iter().zip(&reference).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{name} per {per} m={m} k={k} n={n} at {i}: {a} vs {b}"
                    );
                }
                let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                match &portable {
                    None => portable = Some(bits),
                    Some(p) => {
                        assert!(
                            *p == bits,
                            "{name} differs from portable per {per} m={m} k={k} n={n}"
                        )
                    }
                }
            }
            let mut y = vec![f32::NAN; m * n];
            w.matmul(&x, m, &mut y);
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                portable.unwrap(),
                "matmul m={m} k={k} n={n}"
            );
        }
    }

    /// With offsets per 16 and per 32: `matmul` against the f64 product of the rounded x with
    /// the integer weights plus each block's offset times its block sum, as llama.cpp computes
    /// Q2_K/Q5_K (Q8_K activations) and Q5_1 (Q8_1); every weight `s * q + o` exactly.
    #[test]
    fn offsets_add_each_block_sum_times_its_offset() {
        for (per, how) in [(16, Activations::Q8K), (32, Activations::Q8_1)] {
            let (m, k, n) = (3, 512, 70);
            let mut g = Lcg(per as u64);
            let rows: Vec<u8> = (0..k * n).map(|_| (g.next() % 32) as u8).collect();
            let scale: Vec<f32> = (0..n * k / HALF)
                .map(|_| 0.001 + g.f32().abs() * 0.01)
                .collect();
            let offset: Vec<f32> = (0..n * k / per).map(|_| g.f32() * 0.1).collect();
            let w = Q8Blocks::from_rows(k, n, rows.clone(), &scale, HALF)
                .unwrap()
                .with_offsets(per, &offset)
                .unwrap()
                .with_activations(how);
            for (kk, c) in [(0, 0), (17, 5), (511, 69)] {
                let want = scale[c * k / HALF + kk / HALF] * rows[c * k + kk] as f32
                    + offset[c * k / per + kk / per];
                assert_eq!(w.value(kk, c).to_bits(), want.to_bits());
            }
            let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
            let xr = QuantRows::with(&x, m, k, how);
            let mut y = vec![f32::NAN; m * n];
            w.matmul(&x, m, &mut y);
            for r in 0..m {
                for c in 0..n {
                    let ints: f64 = (0..k)
                        .map(|kk| {
                            (scale[c * k / HALF + kk / HALF] * rows[c * k + kk] as f32) as f64
                                * xr.q[r * k + kk] as f64
                                * xr.scale[(r * k + kk) / QBLOCK] as f64
                        })
                        .sum();
                    let offsets: f64 = (0..k / per)
                        .map(|b| {
                            let sum = match per {
                                32 => xr.sum[r * k / 32 + b] as f64,
                                _ => {
                                    let q = &xr.q[r * k + b * per..][..per];
                                    let isum: i32 = q.iter().map(|&v| v as i32).sum();
                                    xr.scale[(r * k + b * per) / QBLOCK] as f64 * isum as f64
                                }
                            };
                            offset[c * k / per + b] as f64 * sum
                        })
                        .sum();
                    let (got, want) = (y[r * n + c] as f64, ints + offsets);
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "per {per} ({r}, {c}): {got} vs {want}"
                    );
                }
            }
            let one = same_on_threads(m * n, |y| w.matmul(&x, m, y));
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&y));
        }
    }

    #[test]
    fn q8_blocks_are_the_same_on_threads() {
        let (m, k, n) = (6, 1024, 1000);
        let mut g = Lcg(11);
        let (_, _, w) = weights(&mut g, k, n);
        let x: Vec<f32> = (0..m * k).map(|_| g.f32()).collect();
        let one = same_on_threads(m * n, |y| w.matmul(&x, m, y));
        assert!(one.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Q8Blocks::from_rows(48, 1, vec![0; 48], &[1.0; 3], HALF).is_err());
        assert!(Q8Blocks::from_rows(32, 1, vec![0; 32], &[1.0; 1], HALF).is_err());
        assert!(Q8Blocks::from_rows(32, 1, vec![0; 31], &[1.0; 2], HALF).is_err());
        assert!(Q8Blocks::from_rows(32, 1, vec![0x80; 32], &[1.0; 2], HALF).is_err());
    }
}
