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
//   element i = 4g + m gets z_m.
// The tag in the key keeps this stream apart from torch's own Philox streams (same seed,
// counters laid out differently) so our noise is not correlated with e.g. torch.randn's.
#pragma once

#include <cmath>
#include <cstdint>

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

// Philox4x32 with 10 rounds (Salmon et al., SC'11; the Random123 reference; same constants as
// curand's and torch's Philox). Checked against the Random123 known-answer vectors in the tests.
BPO_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, ctr.z, &hi1);
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

// Uniform in the open interval (0, 1) from the top 24 bits: exact in fp32, never 0, so the log
// below is finite (the tail is cut at |z| < sqrt(2 * 25 * ln 2) = 5.9, probability 3.6e-9).
BPO_HD float uniform_open01(uint32_t r) {
  return (static_cast<float>(r >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
}

// Uniform in [-1, 1) from the top 24 bits (exact in fp32): the angle in units of pi.
BPO_HD float uniform_pm1(uint32_t r) {
  return static_cast<float>(r >> 8) * 1.1920928955078125e-07f - 1.0f;  // 2^-23
}

// Box-Muller: two independent N(0, 1) from two uniforms. Exact transform (not an approximation
// of the Gaussian), computed in fp32. The device uses the accurate logf and sincospif (angle in
// units of pi, so no range reduction error); the host uses logf and sin/cos of the angle in double. Both are within ~2 ulp
// of the exact value, so CPU and CUDA agree up to float rounding.
BPO_HD void box_muller(uint32_t ra, uint32_t rb, float* z0, float* z1) {
  const float u = uniform_open01(ra);
  const float v = uniform_pm1(rb);
#if defined(__CUDA_ARCH__)
  const float rad = sqrtf(-2.0f * logf(u));
  float s, c;
  sincospif(v, &s, &c);
#else
  const float rad = std::sqrt(-2.0f * std::log(u));
  // The angle in double so that the host, like sincospif, has no argument rounding error.
  const double ang = 3.14159265358979323846 * static_cast<double>(v);
  const float s = static_cast<float>(std::sin(ang));
  const float c = static_cast<float>(std::cos(ang));
#endif
  *z0 = rad * c;
  *z1 = rad * s;
}

// The 4 normals of Philox group g of output image j.
BPO_HD void normal4(uint64_t seed, uint64_t offset, uint32_t j, uint32_t g, float z[4]) {
  const U32x4 ctr{g, j, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  const U32x4 r = philox4x32_10(ctr, static_cast<uint32_t>(seed),
                                static_cast<uint32_t>(seed >> 32) ^ kNoiseStreamTag);
  box_muller(r.x, r.y, &z[0], &z[1]);
  box_muller(r.z, r.w, &z[2], &z[3]);
}

}  // namespace bpo_fast
