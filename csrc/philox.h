// Counter-based Philox4x32-10 and the Box-Muller Gaussian transform, shared by the CPU (.cpp)
// and CUDA (.cu) implementations of bpo_fast::diffusion_noise.
//
// Why counter-based: the noise of element i of output image j is a pure function of
// (seed, offset, j, i), so it never depends on the launch geometry, the number of threads, the
// GPU model or whether the CPU or the CUDA kernel computed it.
//
// The stream (the contract the tests and bpo_fast.ops.noise.philox_normal_reference check):
//   key     = (seed_lo, seed_hi ^ kNoiseStreamTag)
//   counter = (g, j, offset_lo, offset_hi)     with g = i / 4 (one Philox call per 4 elements)
//   (r0, r1, r2, r3) = Philox4x32-10(counter, key)
//   (z0, z1) = box_muller(r0, r1), (z2, z3) = box_muller(r2, r3)
//   element i = 4g + m gets z_m, where box_muller(ra, rb) = sqrt(-2 ln u) * (cos, sin)(theta),
//   u = ((ra >> 9) + 1/2) * 2^-23 in (0, 1), theta = pi * ((rb >> 8) * 2^-23 - 1) in [-pi, pi).
// The tag in the key keeps this stream apart from torch's own Philox streams (same seed,
// counters laid out differently) so our noise is not correlated with e.g. torch.randn's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BPO_HD __host__ __device__ __forceinline__
#else
#define BPO_HD inline
#endif

namespace bpo_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr uint32_t kNoiseStreamTag = 0x62706E31u;  // "bpn1"

struct U32x4 {
  uint32_t x, y, z, w;
};

BPO_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// The 10 round keys of one Philox key, computed once per thread (they are the same for the whole
// launch, so the GPU keeps them in uniform registers instead of re-deriving them per call).
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
};

// The op's key for a seed: (seed_lo, seed_hi ^ tag).
BPO_HD PhiloxKeys noise_keys(uint64_t seed) {
  PhiloxKeys ks;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32) ^ kNoiseStreamTag;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    ks.k0[r] = k0;
    ks.k1[r] = k1;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ks;
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11; the Random123 reference; same constants as
// curand's and torch's Philox). Checked against the Random123 known-answer vectors in the tests.
BPO_HD U32x4 philox4x32_10(U32x4 ctr, const PhiloxKeys& ks) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, ctr.z, &hi1);
    ctr = U32x4{hi1 ^ ctr.y ^ ks.k0[r], lo1, hi0 ^ ctr.w ^ ks.k1[r], lo0};
  }
  return ctr;
}

// Uniform in the open interval (0, 1) from the top 23 bits: (k + 1/2) 2^-23 needs 24 significant
// bits, so it is exact in fp32 and never rounds to 1 (with 24 bits, k + 1/2 would round to 2^24
// for the largest k and give u = 1, a zero radius, and a NaN through rsqrt). Never 0 either, so
// the log is finite: the Gaussian tail is cut at |z| < sqrt(2 * 24 * ln 2) = 5.77 (probability
// 8e-9 for an exact Gaussian).
BPO_HD float uniform_open01(uint32_t r) {
  // k * 2^-23 + 2^-24: exact whether or not the compiler fuses it into one FMA.
  return static_cast<float>(r >> 9) * 1.1920928955078125e-07f + 5.9604644775390625e-08f;
}

// Uniform in [-1, 1) from the top 24 bits (exact in fp32): the angle in units of pi.
BPO_HD float uniform_pm1(uint32_t r) {
  return static_cast<float>(r >> 8) * 1.1920928955078125e-07f - 1.0f;  // 2^-23
}

BPO_HD int32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
#endif
}

BPO_HD float bits_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

// ln(u) for u in [2^-24, 1 - 2^-24], the range of uniform_open01: Cephes' logf (range reduction
// to [sqrt(1/2), sqrt(2)), degree-8 polynomial), without the branches for 0,
// negative, denormal, inf and NaN inputs that cannot occur here. Accurate to a few ulp over the
// whole range (the tests check the algorithm on all 2^23 possible inputs against double: < 1.5 ulp), and
// relative accuracy near u = 1 matters: -2 ln(u) is small there and an absolute-error log
// (lg2.approx) would give a visibly wrong radius.
BPO_HD float log_unit(float u) {
  const int32_t bits = float_bits(u);
  const int32_t e = (bits - 0x3F3504F3) & static_cast<int32_t>(0xFF800000u);
  const float x = bits_float(bits - e) - 1.0f;  // exact: mantissa in [sqrt(1/2), sqrt(2))
  const float fe = static_cast<float>(e >> 23);
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  // ln 2 as one fp32 constant: its rounding error (1.7e-8 relative) is far below an ulp of the
  // result because fe * ln 2 dominates the sum exactly when fe is large.
  const float y = (x * z) * p - 0.5f * z;
  return 0.693147180559945309f * fe + (x + y);
}

#if defined(__CUDA_ARCH__)
// rsqrt without the denormal fix-up (the argument is >= 1.1e-7, never denormal).
__device__ __forceinline__ float rsqrt_ftz(float x) {
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// Box-Muller: two independent N(0, scale^2) from two uniforms (scale folded into the radius to
// save a multiply per element). An exact transform (not an approximation of the Gaussian),
// computed in fp32. The GPU spends its instructions where accuracy matters and is cheap
// elsewhere: log_unit above (relative accuracy), the square root as r2 * rsqrt(r2) (~2 ulp) and
// the hardware sine/cosine on [-pi, pi) (absolute error < 4e-7, so < 2.5e-6 on z). The host
// computes the log, root and angle accurately (double sin/cos). CPU and CUDA therefore agree to
// a few 1e-7 typically and < 3e-6 (times scale) at worst.
BPO_HD void box_muller(uint32_t ra, uint32_t rb, float scale, float* z0, float* z1) {
  const float u = uniform_open01(ra);
#if defined(__CUDA_ARCH__)
  const float r2 = -2.0f * log_unit(u);  // >= 1.1e-7 > 0: rsqrt is finite
  const float rad = scale * (r2 * rsqrt_ftz(r2));
  // angle = pi * uniform_pm1(rb), as one FMA
  const float ang = static_cast<float>(rb >> 8) * 3.7450702829239286e-07f - 3.14159265358979323846f;
  float s, c;
  __sincosf(ang, &s, &c);
#else
  const float rad = scale * std::sqrt(-2.0f * std::log(u));
  // The angle in double so that the host has no argument rounding error.
  const double ang = 3.14159265358979323846 * static_cast<double>(uniform_pm1(rb));
  const float s = static_cast<float>(std::sin(ang));
  const float c = static_cast<float>(std::cos(ang));
#endif
  *z0 = rad * c;
  *z1 = rad * s;
}

// scale * the 4 normals of Philox group g of output image j (see the stream at the top).
BPO_HD void normal4(const PhiloxKeys& ks, uint64_t offset, uint32_t j, uint32_t g, float scale,
                    float z[4]) {
  const U32x4 ctr{g, j, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  const U32x4 r = philox4x32_10(ctr, ks);
  box_muller(r.x, r.y, scale, &z[0], &z[1]);
  box_muller(r.z, r.w, scale, &z[2], &z[3]);
}

}  // namespace bpo_fast
