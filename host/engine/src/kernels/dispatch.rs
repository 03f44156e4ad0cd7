//! The products on activations rounded to 8 bits ([`QuantRows`]): x quantized once, the weight's
//! panels split across threads, each share run by the best kernel this CPU has. Shared by the
//! Q4_1 ([`super::q4_1`]) and Q8 ([`super::q8`]) weights, which bring the kernels.

use super::offsets::BlockOffsets;
use super::parallel::{parallel_ranges, OutPtr};
use super::quantize::{Activations, QuantRows};

/// A weight `[K, N]` stored in panels of [`Self::PANEL`] columns, with a kernel per instruction
/// set. Each kernel computes the columns of panels `p0..p1` for rows `0..m` of y (`[m, N]`).
///
/// # Safety (of every kernel)
/// `x` holds `m` rows of K; `y` points at `m * N` writable floats of which no other thread
/// writes the columns of panels `p0..p1`; `p1 <= N / PANEL` rounded up; the CPU has the
/// kernel's features.
pub(crate) trait PanelKernels: Sync {
    /// Columns per panel.
    const PANEL: usize;

    fn k(&self) -> usize;

    fn n(&self) -> usize;

    /// How the activations are rounded for this weight.
    fn activations(&self) -> Activations;

    /// Per-block offsets the kernels leave out, added after them.
    fn offsets(&self) -> Option<&BlockOffsets> {
        None
    }

    /// Any CPU.
    unsafe fn portable(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize);

    /// AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize);

    /// That and AVX-512 VNNI (`vpdpbusd`), F, BW and VL ([`super::cpu::avx512_vnni`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn vnni(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize);

    /// wasm32 built with simd128.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    unsafe fn simd128(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize);

    /// `y = x @ W` for `x` `[m, K]` and `y` `[m, N]`, row-major, x rounded to 8 bits per block.
    fn matmul(&self, x: &[f32], m: usize, y: &mut [f32])
    where
        Self: Sized,
    {
        let (k, n) = (self.k(), self.n());
        assert_eq!(x.len(), m * k);
        assert_eq!(y.len(), m * n);
        if m == 0 {
            return;
        }
        let xq = QuantRows::with(x, m, k, self.activations());
        let sums = self.offsets().map(|o| o.block_sums(&xq));
        let out = OutPtr(y.as_mut_ptr());
        let run = |p0: usize, p1: usize| {
            // SAFETY: `xq` holds m rows of K, `out` m rows of N; every call writes only the
            // columns of panels p0..p1 <= N / PANEL, and the ranges of the calls are disjoint;
            // `sums` are the offsets' block sums of `xq`.
            unsafe {
                panels(self, &xq, m, out, p0, p1);
                if let (Some(o), Some(sums)) = (self.offsets(), &sums) {
                    o.add(sums, m, n, out, p0 * Self::PANEL, (p1 * Self::PANEL).min(n));
                }
            }
        };
        parallel_ranges(n.div_ceil(Self::PANEL), m * k * n, &run);
    }
}

/// Panels `p0..p1`, by the kernel for this CPU.
///
/// # Safety
/// As [`PanelKernels`], less the CPU features (checked here).
unsafe fn panels<W: PanelKernels>(w: &W, x: &QuantRows, m: usize, y: OutPtr, p0: usize, p1: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::cpu::avx512_vnni() {
            // SAFETY: the CPU has AVX-512 VNNI (and AVX2, FMA, F16C); the rest is the caller's.
            return unsafe { w.vnni(x, m, y.0, p0, p1) };
        }
        if super::cpu::avx2_fma_f16c() {
            // SAFETY: the CPU has AVX2, FMA and F16C; the rest is the caller's contract.
            return unsafe { w.avx2(x, m, y.0, p0, p1) };
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    // SAFETY: this build requires simd128; the rest is the caller's contract.
    return unsafe { w.simd128(x, m, y.0, p0, p1) };
    #[allow(unreachable_code)]
    // SAFETY: the caller's contract (the portable kernel needs no CPU feature).
    unsafe {
        w.portable(x, m, y.0, p0, p1)
    }
}

/// A kernel of a [`PanelKernels`] weight.
#[cfg(test)]
pub(crate) type Kernel<W> = unsafe fn(&W, &QuantRows, usize, *mut f32, usize, usize);

/// Every kernel this CPU runs, by name.
#[cfg(test)]
pub(crate) fn kernels<W: PanelKernels>() -> Vec<(&'static str, Kernel<W>)> {
    #[allow(unused_mut)]
    let mut v: Vec<(&'static str, Kernel<W>)> = vec![("portable", W::portable)];
    #[cfg(target_arch = "x86_64")]
    {
        if super::cpu::avx2_fma_f16c() {
            v.push(("avx2", W::avx2));
        }
        if super::cpu::avx512_vnni() {
            v.push(("vnni", W::vnni));
        }
    }
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    v.push(("simd128", W::simd128));
    v
}

/// Implements [`PanelKernels`] for a weight type with fields `k`, `n` and `activations` (and
/// `offsets`, an `Option<BlockOffsets>`, when the last argument names it; generic types
/// as `impl<T: Bound> Type<T>`), from the kernels of the
/// calling module, all `unsafe fn(&W, &QuantRows, usize, *mut f32, usize, usize)` under the
/// trait's contract: `portable::panels`, `x86::panels_avx2`, `x86::panels_vnni`, `wasm::panels`.
macro_rules! panel_kernels {
    (impl<$($g:ident: $bound:path),*> $w:ty, $panel:expr $(, $offsets:ident)?) => {
        impl<$($g: $bound),*> $crate::kernels::dispatch::PanelKernels for $w {
            const PANEL: usize = $panel;

            fn k(&self) -> usize {
                self.k
            }

            fn n(&self) -> usize {
                self.n
            }

            fn activations(&self) -> $crate::kernels::quantize::Activations {
                self.activations
            }

            $(
                fn $offsets(&self) -> Option<&$crate::kernels::offsets::BlockOffsets> {
                    self.$offsets.as_ref()
                }
            )?

            unsafe fn portable(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
                // SAFETY: the kernel's contract is the trait's.
                unsafe { portable::panels(self, x, m, y, p0, p1) }
            }

            #[cfg(target_arch = "x86_64")]
            unsafe fn avx2(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
                // SAFETY: the kernel's contract is the trait's.
                unsafe { x86::panels_avx2(self, x, m, y, p0, p1) }
            }

            #[cfg(target_arch = "x86_64")]
            unsafe fn vnni(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
                // SAFETY: the kernel's contract is the trait's.
                unsafe { x86::panels_vnni(self, x, m, y, p0, p1) }
            }

            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            unsafe fn simd128(&self, x: &QuantRows, m: usize, y: *mut f32, p0: usize, p1: usize) {
                // SAFETY: the kernel's contract is the trait's.
                unsafe { wasm::panels(self, x, m, y, p0, p1) }
            }
        }
    };
    ($w:ty, $panel:expr $(, $offsets:ident)?) => {
        $crate::kernels::dispatch::panel_kernels!(impl<> $w, $panel $(, $offsets)?);
    };
}
pub(crate) use panel_kernels;
