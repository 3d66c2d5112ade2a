// bpo_fast::diffusion_noise, CUDA implementation (schema and CPU version in noise.cpp).
//
// One pass over memory: every thread loads 8 contiguous input elements of one image once
// (vector load where the layout allows), turns them into x0, then for each of the image's K
// noise levels draws 8 normals (two Philox4x32-10 calls, keyed by output image and element
// index, see philox.h) and writes 8 contiguous outputs (one vector store).
//
// RNG: seed/offset come from the CUDA generator through philox_cuda_state() and are read in the
// kernel with at::cuda::philox::unpack(), the graph-safe way: under CUDA-graph capture the kernel
// reads the seed/offset from device memory that each replay advances, so every replay draws
// fresh noise, exactly as the same sequence of eager calls would.
// Not ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers this file does not need.
#include <c10/cuda/CUDAStream.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "noise_common.h"

namespace bpo_fast {
namespace {

constexpr int kVec = 8;  // contiguous elements per thread: two Philox groups
constexpr int kThreads = 256;

// Vector of N elements loaded/stored with the widest aligned access (at most 16 bytes each).
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Vec {
  T v[N];
};

enum Path : int {
  kNCHWVec = 0,  // contiguous [B, C, H, W], H*W % 8 == 0, aligned: vector loads
  kNHWC = 1,     // contiguous [B, H, W, C] (a channels-last view): 8 pixels x all C channels
  kGeneric = 2,  // any strides: per-element loads, (c, h, w) stepped incrementally
};

// 8 contiguous, aligned inputs as float: one or two vector loads.
template <typename T>
__device__ __forceinline__ void load8_as_float(const T* p, float* f) {
  const Vec<T, kVec> v = *reinterpret_cast<const Vec<T, kVec>*>(p);
#pragma unroll
  for (int m = 0; m < kVec; ++m) f[m] = static_cast<float>(v.v[m]);
}

// uint8: one 8-byte load, then each byte to float in two instructions (byte permute into the
// mantissa of 2^23, subtract 2^23) instead of unpacking bytes and using the slower I2F.
__device__ __forceinline__ void load8_as_float(const uint8_t* p, float* f) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
#pragma unroll
  for (int m = 0; m < kVec; ++m) {
    const uint32_t bits = __byte_perm(m < 4 ? w.x : w.y, 0x4B000000u, 0x7540u | (m % 4));
    f[m] = __uint_as_float(bits) - 8388608.0f;
  }
}

template <typename out_t>
__device__ __forceinline__ void emit_levels(const float* x0, const int* cid, int n, int64_t b,
                                            int64_t i0, const int64_t* __restrict__ ts,
                                            const float* __restrict__ sab,
                                            const float* __restrict__ s1mab,
                                            out_t* __restrict__ out, const NoiseShape& s,
                                            const ChannelCoef& cc, int64_t CHW,
                                            const PhiloxKeys& ks, uint64_t offset,
                                            bool vec_store) {
  // i0 is a multiple of 4 on every path (see the launcher), so the 8 elements are exactly the
  // Philox groups i0/4 and i0/4 + 1.
  const uint32_t g0 = static_cast<uint32_t>(i0 >> 2);
  for (int64_t k = 0; k < s.K; ++k) {
    const int64_t jj = b * s.K + k;
    int64_t t = ts[jj];
    // Out-of-range timesteps are rejected on the host where that needs no sync; the clamp keeps
    // the table reads in bounds when the check was skipped (graph capture, torch.compile).
    t = t < 0 ? 0 : (t >= s.num_steps ? s.num_steps - 1 : t);
    const float a = sab[t], sd = s1mab[t];
    float z[kVec];
    normal4(ks, offset, static_cast<uint32_t>(jj), g0, sd, z);
    if (n > 4) normal4(ks, offset, static_cast<uint32_t>(jj), g0 + 1, sd, z + 4);
    out_t* o = out + jj * CHW + i0;
    if (vec_store) {
      Vec<out_t, kVec> v;
#pragma unroll
      for (int m = 0; m < kVec; ++m)
        v.v[m] = static_cast<out_t>(noise_output(x0[m], z[m], a, cc, cid[m], s.pixel_space));
      *reinterpret_cast<Vec<out_t, kVec>*>(o) = v;
    } else {
#pragma unroll
      for (int m = 0; m < kVec; ++m)
        if (m < n)
          o[m] = static_cast<out_t>(noise_output(x0[m], z[m], a, cc, cid[m], s.pixel_space));
    }
  }
}

template <typename in_t, typename out_t, int kPath>
__global__ void __launch_bounds__(kThreads)
    diffusion_noise_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ ts,
                           const float* __restrict__ sab, const float* __restrict__ s1mab,
                           out_t* __restrict__ out, NoiseShape s, ChannelCoef cc,
                           at::PhiloxCudaState philox, int64_t items_per_image) {
  const auto seeds = at::cuda::philox::unpack(philox);
  const PhiloxKeys ks = noise_keys(std::get<0>(seeds));
  const uint64_t offset = std::get<1>(seeds);
  const int64_t HW = s.H * s.W;
  const int64_t CHW = s.C * HW;
  const bool out_aligned = CHW % kVec == 0;
  // The NCHW path runs one channel plane per grid row (y = b * C + c): the channel and its
  // coefficients are uniform per block, and no thread divides to find them.
  const int64_t rows = kPath == kNCHWVec ? s.B * s.C : s.B;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t b = kPath == kNCHWVec ? row / s.C : row;
    const int64_t plane = kPath == kNCHWVec ? row - b * s.C : 0;
    const in_t* xb = x + b * s.sb;
    for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
         q < items_per_image; q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float x0[kVec];
      int cid[kVec];
      if (kPath == kNHWC) {
        // 8 pixels, all channels: the 8*C input bytes are contiguous, read once.
        const int64_t p0 = q * kVec;
        for (int64_t c = 0; c < s.C; ++c) {
          const int ci = s.per_channel ? static_cast<int>(c) : 0;
#pragma unroll
          for (int m = 0; m < kVec; ++m) {
            x0[m] = noise_input(static_cast<float>(xb[(p0 + m) * s.C + c]), cc, ci);
            cid[m] = ci;
          }
          emit_levels(x0, cid, kVec, b, c * HW + p0, ts, sab, s1mab, out, s, cc, CHW, ks,
                      offset, true);
        }
      } else if (kPath == kNCHWVec) {
        const int64_t i0 = plane * HW + q * kVec;
        const int ci = s.per_channel ? static_cast<int>(plane) : 0;
        load8_as_float(xb + i0, x0);
#pragma unroll
        for (int m = 0; m < kVec; ++m) {
          x0[m] = noise_input(x0[m], cc, ci);
          cid[m] = ci;
        }
        emit_levels(x0, cid, kVec, b, i0, ts, sab, s1mab, out, s, cc, CHW, ks, offset, true);
      } else {
        const int64_t i0 = q * kVec;
        const int n = static_cast<int>(min(static_cast<int64_t>(kVec), CHW - i0));
        int64_t c = i0 / HW, h = (i0 - c * HW) / s.W, w = i0 % s.W;
#pragma unroll
        for (int m = 0; m < kVec; ++m) {
          cid[m] = s.per_channel ? static_cast<int>(c) : 0;
          x0[m] = m < n ? noise_input(static_cast<float>(xb[c * s.sc + h * s.sh + w * s.sw]), cc,
                                      cid[m])
                        : 0.0f;
          if (++w == s.W) {
            w = 0;
            if (++h == s.H) {
              h = 0;
              ++c;
            }
          }
        }
        emit_levels(x0, cid, n, b, i0, ts, sab, s1mab, out, s, cc, CHW, ks, offset,
                    out_aligned && n == kVec);
      }
    }
  }
}

template <typename in_t, typename out_t>
void launch(const at::Tensor& images, const at::Tensor& ts, const at::Tensor& sab,
            const at::Tensor& s1mab, at::Tensor& out, const NoiseShape& s, const ChannelCoef& cc,
            const at::PhiloxCudaState& philox) {
  const int64_t HW = s.H * s.W;
  const int64_t CHW = s.C * HW;
  const in_t* x = images.data_ptr<in_t>();
  const bool aligned = reinterpret_cast<uintptr_t>(x) % alignof(Vec<in_t, kVec>) == 0 &&
                       (s.sb * static_cast<int64_t>(sizeof(in_t))) % alignof(Vec<in_t, kVec>) == 0;
  const bool nchw = s.sw == 1 && s.sh == s.W && s.sc == HW;
  const bool nhwc = s.sc == 1 && s.sw == s.C && s.sh == s.W * s.C;
  // Both fast paths need every 8-element run inside one channel plane and 4-aligned Philox
  // groups: H*W % 8 == 0 (true for every common resolution, e.g. 224, 336, 384, 448).
  int path = kGeneric;
  if (HW % kVec == 0 && nchw && aligned) path = kNCHWVec;
  else if (HW % kVec == 0 && nhwc) path = kNHWC;
  // Work items per grid row: 8-element runs of a channel plane (NCHW), 8-pixel runs of an
  // image (NHWC, all channels each) or 8-element runs of an image (generic).
  const int64_t items = path == kGeneric ? (CHW + kVec - 1) / kVec : HW / kVec;
  const int64_t rows = path == kNCHWVec ? s.B * s.C : s.B;
  const int64_t max_x = int64_t{1} << 30;
  dim3 grid(static_cast<unsigned>(std::min<int64_t>((items + kThreads - 1) / kThreads, max_x)),
            static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* tp = ts.data_ptr<int64_t>();
  const float* a = sab.data_ptr<float>();
  const float* sd = s1mab.data_ptr<float>();
  out_t* o = out.data_ptr<out_t>();
  switch (path) {
    case kNCHWVec:
      diffusion_noise_kernel<in_t, out_t, kNCHWVec>
          <<<grid, kThreads, 0, stream>>>(x, tp, a, sd, o, s, cc, philox, items);
      break;
    case kNHWC:
      diffusion_noise_kernel<in_t, out_t, kNHWC>
          <<<grid, kThreads, 0, stream>>>(x, tp, a, sd, o, s, cc, philox, items);
      break;
    default:
      diffusion_noise_kernel<in_t, out_t, kGeneric>
          <<<grid, kThreads, 0, stream>>>(x, tp, a, sd, o, s, cc, philox, items);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename in_t>
void dispatch_out(const at::Tensor& images, const at::Tensor& ts, const at::Tensor& sab,
                  const at::Tensor& s1mab, at::Tensor& out, const NoiseShape& s,
                  const ChannelCoef& cc, const at::PhiloxCudaState& philox) {
  switch (out.scalar_type()) {
    case at::kFloat:
      launch<in_t, float>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    case at::kBFloat16:
      launch<in_t, c10::BFloat16>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    case at::kHalf:
      launch<in_t, c10::Half>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    default:
      TORCH_CHECK(false, "diffusion_noise: unsupported out_dtype ", out.scalar_type());
  }
}

at::Tensor diffusion_noise_cuda(const at::Tensor& images, const at::Tensor& timesteps,
                                const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                                c10::optional<at::ArrayRef<double>> mean,
                                c10::optional<at::ArrayRef<double>> std_, bool pixel_space,
                                c10::optional<at::ScalarType> out_dtype,
                                c10::optional<int64_t> seed, int64_t offset,
                                c10::optional<at::Generator> generator) {
  ChannelCoef cc;
  const NoiseShape s =
      check_noise_args(images, timesteps, sqrt_ab, sqrt_1mab, mean, std_, pixel_space, &cc);
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out = alloc_noise_output(images, timesteps, resolve_out_dtype(out_dtype));
  if (out.numel() == 0) return out;
  // Tiny tensors: a contiguous copy (if any) is negligible and capturable. The images keep
  // their strides: the kernel reads NCHW, NHWC and any other layout in place.
  const at::Tensor ts = timesteps.contiguous();
  const at::Tensor sab = sqrt_ab.contiguous(), s1mab = sqrt_1mab.contiguous();
  at::PhiloxCudaState philox;
  if (seed.has_value()) {
    philox = at::PhiloxCudaState(static_cast<uint64_t>(*seed), static_cast<uint64_t>(offset));
  } else {
    auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
        generator, at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // Our counters keep the whole call under one Philox offset value, so each call needs one
    // fresh offset; 4 is the smallest increment the generator accepts.
    philox = gen->philox_cuda_state(4);
  }
  switch (images.scalar_type()) {
    case at::kByte:
      dispatch_out<uint8_t>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    case at::kFloat:
      dispatch_out<float>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    case at::kBFloat16:
      dispatch_out<c10::BFloat16>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    case at::kHalf:
      dispatch_out<c10::Half>(images, ts, sab, s1mab, out, s, cc, philox);
      break;
    default:
      TORCH_CHECK(false, "diffusion_noise: unsupported images dtype ", images.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace bpo_fast

TORCH_LIBRARY_IMPL(bpo_fast, CUDA, m) {
  m.impl("diffusion_noise", &bpo_fast::diffusion_noise_cuda);
}
