// bpo_fast::diffusion_noise: schema and CPU implementation (the CUDA one is in noise_cuda.cu).
//
//   out[b, k] = a_t * x0[b] + s_t * eps[b*K + k]      t = timesteps[b, k]
// with x0 the (normalised or [-1, 1]) image, a_t = sqrt(alphas_cumprod[t]),
// s_t = sqrt(1 - alphas_cumprod[t]), eps from the counter-based Philox stream of philox.h.
// One pass over memory: each input image is read once for all of its K levels.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "noise_common.h"

namespace bpo_fast {
namespace {

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename in_t, typename out_t>
void noise_cpu_kernel(const in_t* x, const int64_t* ts, const float* sab, const float* s1mab,
                      out_t* out, const NoiseShape& s, const ChannelCoef& cc, uint64_t seed,
                      uint64_t offset) {
  const int64_t HW = s.H * s.W;
  const int64_t CHW = s.C * HW;
  // Chunks of a multiple of 4 elements (a whole number of Philox groups) per task; parallel over
  // images x chunks so that small batches of large images still use every core.
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (CHW + kChunk - 1) / kChunk;
  const bool contiguous = s.sw == 1 && s.sh == s.W && s.sc == HW;
  const PhiloxKeys ks = noise_keys(seed);
  // Grain 4 chunks (~16k elements, tens of microseconds): small calls stay on the calling thread.
  at::parallel_for(0, s.B * chunks, 4, [&](int64_t begin, int64_t end) {
    float x0[kChunk];
    uint8_t cid[kChunk];  // coefficient index of each element (its channel, or 0)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t i0 = (item - b * chunks) * kChunk;
      const int64_t n = std::min(kChunk, CHW - i0);
      // Gather and transform the input once (any strides; (c, h, w) stepped incrementally).
      int64_t c = i0 / HW, h = (i0 % HW) / s.W, w = i0 % s.W;
      const in_t* xb = x + b * s.sb;
      for (int64_t m = 0; m < n; ++m) {
        const int64_t off = contiguous ? i0 + m : c * s.sc + h * s.sh + w * s.sw;
        cid[m] = s.per_channel ? static_cast<uint8_t>(c) : 0;
        x0[m] = noise_input(to_float(xb[off]), cc, cid[m]);
        if (++w == s.W) {
          w = 0;
          if (++h == s.H) {
            h = 0;
            ++c;
          }
        }
      }
      for (int64_t k = 0; k < s.K; ++k) {
        int64_t t = ts[b * s.K + k];
        t = t < 0 ? 0 : (t >= s.num_steps ? s.num_steps - 1 : t);  // checked by the caller
        const float a = sab[t], sd = s1mab[t];
        const uint32_t j = static_cast<uint32_t>(b * s.K + k);
        out_t* o = out + (b * s.K + k) * CHW + i0;
        for (int64_t m0 = 0; m0 < n; m0 += 4) {
          float z[4];
          normal4(ks, offset, j, static_cast<uint32_t>((i0 + m0) >> 2), sd, z);
          const int64_t mm = std::min<int64_t>(4, n - m0);
          for (int64_t q = 0; q < mm; ++q) {
            o[m0 + q] = static_cast<out_t>(
                noise_output(x0[m0 + q], z[q], a, cc, cid[m0 + q], s.pixel_space));
          }
        }
      }
    }
  });
}

template <typename in_t>
void dispatch_out(const at::Tensor& images, const at::Tensor& ts, const at::Tensor& sab,
                  const at::Tensor& s1mab, at::Tensor& out, const NoiseShape& s,
                  const ChannelCoef& cc, uint64_t seed, uint64_t offset) {
  const in_t* x = images.data_ptr<in_t>();
  const int64_t* tp = ts.data_ptr<int64_t>();
  const float* a = sab.data_ptr<float>();
  const float* sd = s1mab.data_ptr<float>();
  switch (out.scalar_type()) {
    case at::kFloat:
      noise_cpu_kernel(x, tp, a, sd, out.data_ptr<float>(), s, cc, seed, offset);
      break;
    case at::kBFloat16:
      noise_cpu_kernel(x, tp, a, sd, out.data_ptr<c10::BFloat16>(), s, cc, seed, offset);
      break;
    case at::kHalf:
      noise_cpu_kernel(x, tp, a, sd, out.data_ptr<c10::Half>(), s, cc, seed, offset);
      break;
    default:
      TORCH_CHECK(false, "diffusion_noise: unsupported out_dtype ", out.scalar_type());
  }
}

at::Tensor diffusion_noise_cpu(const at::Tensor& images, const at::Tensor& timesteps,
                               const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                               c10::optional<at::ArrayRef<double>> mean,
                               c10::optional<at::ArrayRef<double>> std_, bool pixel_space,
                               c10::optional<at::ScalarType> out_dtype,
                               c10::optional<int64_t> seed, int64_t offset,
                               c10::optional<at::Generator> generator) {
  ChannelCoef cc;
  const NoiseShape s =
      check_noise_args(images, timesteps, sqrt_ab, sqrt_1mab, mean, std_, pixel_space, &cc);
  at::Tensor out = alloc_noise_output(images, timesteps, resolve_out_dtype(out_dtype));
  if (out.numel() == 0) return out;
  // Timesteps and tables are tiny: contiguous copies cost nothing. The images keep their
  // strides (the kernel reads any layout).
  const at::Tensor ts = timesteps.contiguous();
  const at::Tensor sab = sqrt_ab.contiguous(), s1mab = sqrt_1mab.contiguous();
  {
    const int64_t* tp = ts.data_ptr<int64_t>();
    for (int64_t q = 0; q < ts.numel(); ++q) {
      TORCH_CHECK(tp[q] >= 0 && tp[q] < s.num_steps, "diffusion_noise: timesteps must be in [0, ",
                  s.num_steps, "), got ", tp[q]);
    }
  }
  uint64_t seed_v, offset_v = static_cast<uint64_t>(offset);
  if (seed.has_value()) {
    seed_v = static_cast<uint64_t>(*seed);
  } else {
    // A fresh 64-bit Philox key per call from the CPU generator: torch.manual_seed reproduces
    // the run, and consecutive calls get independent streams.
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
        generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    seed_v = gen->random64();
    offset_v = 0;
  }
  switch (images.scalar_type()) {
    case at::kByte:
      dispatch_out<uint8_t>(images, ts, sab, s1mab, out, s, cc, seed_v, offset_v);
      break;
    case at::kFloat:
      dispatch_out<float>(images, ts, sab, s1mab, out, s, cc, seed_v, offset_v);
      break;
    case at::kBFloat16:
      dispatch_out<c10::BFloat16>(images, ts, sab, s1mab, out, s, cc, seed_v, offset_v);
      break;
    case at::kHalf:
      dispatch_out<c10::Half>(images, ts, sab, s1mab, out, s, cc, seed_v, offset_v);
      break;
    default:
      TORCH_CHECK(false, "diffusion_noise: unsupported images dtype ", images.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace bpo_fast

TORCH_LIBRARY(bpo_fast, m) {
  // seed=None: Philox key from the generator (CPU: a random64() draw; CUDA: the generator's
  // seed and Philox offset, advanced the graph-safe way). seed given: that key and `offset`,
  // identical on every device.
  m.def(
      "diffusion_noise(Tensor images, Tensor timesteps, Tensor sqrt_alphas_cumprod, "
      "Tensor sqrt_one_minus_alphas_cumprod, float[]? mean=None, float[]? std=None, "
      "bool pixel_space=False, ScalarType? out_dtype=None, int? seed=None, int offset=0, "
      "Generator? generator=None) -> Tensor",
      {at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(bpo_fast, CPU, m) {
  m.impl("diffusion_noise", &bpo_fast::diffusion_noise_cpu);
}

#ifndef BPO_FAST_NO_PYTHON_MODULE
// Importing bpo_fast._C registers the ops above; the module itself has no Python functions.
// (CMake builds a plain library for torch.ops.load_library and defines BPO_FAST_NO_PYTHON_MODULE.)
#include <Python.h>
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
