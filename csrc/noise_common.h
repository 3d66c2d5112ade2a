// Host-side pieces shared by the CPU and CUDA implementations of bpo_fast::diffusion_noise:
// argument checks, output allocation, the per-channel affine coefficients, and the per-element
// arithmetic (so that both backends compute exactly the same formula).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "philox.h"

namespace bpo_fast {

// Enough for RGB(A) and multispectral inputs; the coefficients travel by value as a kernel
// argument, so no device tensor (and no host-device sync) is needed for them.
constexpr int kMaxNormChannels = 16;

struct ChannelCoef {
  // Normalised space: x0 = x * in_a[c] + in_b[c]; out = a * x0 + s * eps.
  // Pixel space:      x0 = x * in_a[0] + in_b[0] (= 2u - 1);
  //                   out = clamp((a * x0 + s * eps + 1) / 2, 0, 1) * out_a[c] + out_b[c].
  // Without normalisation only index 0 is used (any channel count).
  float in_a[kMaxNormChannels];
  float in_b[kMaxNormChannels];
  float out_a[kMaxNormChannels];
  float out_b[kMaxNormChannels];
};

struct NoiseShape {
  int64_t B, K, C, H, W;
  int64_t sb, sc, sh, sw;  // element strides of the logical [B, C, H, W] input
  int64_t num_steps;
  bool per_channel;  // whether ChannelCoef is indexed by channel (mean/std given)
  bool pixel_space;
};

// The fp32 arithmetic of one element, shared so that CPU and CUDA agree.
// On the GPU every multiply-add is an explicit fmaf, so that all kernel instantiations (any
// out dtype, any layout path) round identically: a bf16 output is exactly the fp32 one rounded.
BPO_HD float mul_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

BPO_HD float noise_input(float x, const ChannelCoef& cc, int cidx_in) {
  return mul_add(x, cc.in_a[cidx_in], cc.in_b[cidx_in]);
}

// `noise` is s_t * eps (the scale is folded into the Box-Muller radius, see normal4).
BPO_HD float noise_output(float x0, float noise, float a, const ChannelCoef& cc, int cidx,
                          bool pixel_space) {
  const float y = mul_add(a, x0, noise);
  if (!pixel_space) return y;
  float v = (y + 1.0f) * 0.5f;
  v = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
  return mul_add(v, cc.out_a[cidx], cc.out_b[cidx]);
}

inline at::ScalarType resolve_out_dtype(c10::optional<at::ScalarType> out_dtype) {
  const at::ScalarType dt = out_dtype.has_value() ? *out_dtype : at::kFloat;
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "diffusion_noise: out_dtype must be float32, bfloat16 or float16, got ", dt);
  return dt;
}

// Validates the arguments, returns the shape, and fills the channel coefficients.
inline NoiseShape check_noise_args(const at::Tensor& images, const at::Tensor& timesteps,
                                   const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                                   const c10::optional<at::ArrayRef<double>>& mean,
                                   const c10::optional<at::ArrayRef<double>>& std_,
                                   bool pixel_space, ChannelCoef* cc) {
  TORCH_CHECK(images.dim() == 4, "diffusion_noise: images must be 4-D [B, C, H, W], got shape ",
              images.sizes());
  const auto st = images.scalar_type();
  TORCH_CHECK(st == at::kByte || st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "diffusion_noise: images must be uint8, float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(timesteps.scalar_type() == at::kLong,
              "diffusion_noise: timesteps must be int64, got ", timesteps.scalar_type());
  TORCH_CHECK(timesteps.dim() == 1 || timesteps.dim() == 2,
              "diffusion_noise: timesteps must be [B] or [B, K], got shape ", timesteps.sizes());
  TORCH_CHECK(timesteps.size(0) == images.size(0), "diffusion_noise: timesteps has batch ",
              timesteps.size(0), " but images has batch ", images.size(0));
  TORCH_CHECK(timesteps.device() == images.device(), "diffusion_noise: timesteps is on ",
              timesteps.device(), " but images is on ", images.device());
  for (const at::Tensor* t : {&sqrt_ab, &sqrt_1mab}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kFloat && t->device() == images.device(),
                "diffusion_noise: schedule tables must be 1-D float32 on ", images.device());
  }
  TORCH_CHECK(sqrt_ab.numel() == sqrt_1mab.numel() && sqrt_ab.numel() > 0,
              "diffusion_noise: the two schedule tables must have the same, non-zero length");
  TORCH_CHECK(mean.has_value() == std_.has_value(),
              "diffusion_noise: mean and std must be given together");

  NoiseShape s;
  s.B = images.size(0);
  s.C = images.size(1);
  s.H = images.size(2);
  s.W = images.size(3);
  s.K = timesteps.dim() == 2 ? timesteps.size(1) : 1;
  s.sb = images.stride(0);
  s.sc = images.stride(1);
  s.sh = images.stride(2);
  s.sw = images.stride(3);
  s.num_steps = sqrt_ab.numel();
  s.pixel_space = pixel_space;
  s.per_channel = mean.has_value();
  // The Philox counter holds the output image index and the group index in 32 bits each.
  TORCH_CHECK(s.B * s.K <= (int64_t{1} << 32), "diffusion_noise: B * K must be < 2^32");
  TORCH_CHECK(s.C * s.H * s.W <= (int64_t{1} << 34),
              "diffusion_noise: C * H * W must be < 2^34 (Philox counter range)");

  const float in_scale = st == at::kByte ? 1.0f / 255.0f : 1.0f;
  for (int c = 0; c < kMaxNormChannels; ++c) {
    cc->in_a[c] = pixel_space ? 2.0f * in_scale : in_scale;
    cc->in_b[c] = pixel_space ? -1.0f : 0.0f;
    cc->out_a[c] = 1.0f;
    cc->out_b[c] = 0.0f;
  }
  if (s.per_channel) {
    TORCH_CHECK(mean->size() == static_cast<size_t>(s.C) && std_->size() == static_cast<size_t>(s.C),
                "diffusion_noise: mean and std must have one value per channel (C=", s.C,
                "), got ", mean->size(), " and ", std_->size());
    TORCH_CHECK(s.C <= kMaxNormChannels, "diffusion_noise: at most ", kMaxNormChannels,
                " channels when normalising, got ", s.C);
    for (int64_t c = 0; c < s.C; ++c) {
      const double sd = (*std_)[c];
      TORCH_CHECK(sd > 0.0 && std::isfinite(sd) && std::isfinite((*mean)[c]),
                  "diffusion_noise: std must be positive and finite, mean finite");
      const float inv = static_cast<float>(1.0 / sd);
      const float nb = static_cast<float>(-(*mean)[c] / sd);
      if (pixel_space) {
        cc->out_a[c] = inv;
        cc->out_b[c] = nb;
      } else {
        cc->in_a[c] = static_cast<float>(static_cast<double>(in_scale) / sd);
        cc->in_b[c] = nb;
      }
    }
  }
  return s;
}

inline at::Tensor alloc_noise_output(const at::Tensor& images, const at::Tensor& timesteps,
                                     at::ScalarType out_dtype) {
  std::vector<int64_t> shape{images.size(0)};
  if (timesteps.dim() == 2) shape.push_back(timesteps.size(1));
  for (int d = 1; d < 4; ++d) shape.push_back(images.size(d));
  return at::empty(shape, images.options().dtype(out_dtype));
}

}  // namespace bpo_fast
