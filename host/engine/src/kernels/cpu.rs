//! Which vector instructions this CPU has: x86_64 features, detected at run time (std caches
//! the answers), in the combinations the kernels are compiled for.

/// AVX2 (the deterministic float ops).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
}

/// AVX2 and F16C (the fused attention's kernel: a float16 KV cache widens with F16C).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2_f16c() -> bool {
    avx2() && std::is_x86_feature_detected!("f16c")
}

/// AVX2 and FMA (the int8 kernels on f32 activations).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// AVX2, FMA and F16C (activation quantization, the Q4_1 and Q8 kernels' AVX2 versions).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx2_fma_f16c() -> bool {
    avx2_fma() && std::is_x86_feature_detected!("f16c")
}

/// [`avx2_fma_f16c`] and AVX-512 VNNI (`vpdpbusd`) with F, BW and VL: on 256-bit vectors, or
/// 512-bit ones (the Q4_1 kernel). Every CPU with VNNI so far has the other three.
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn avx512_vnni() -> bool {
    avx2_fma_f16c()
        && std::is_x86_feature_detected!("avx512vnni")
        && std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
}
