// Autograd for bpo_fast::diffusion_noise (CPU and CUDA alike, in ATen ops).
//
// The noise is an additive constant, so for float images
//   d out[b, k, c] / d u[b, c] = a_t / std[c]            (normalised space)
//                              = a_t / std[c] * 1[0 < v < 1]   (pixel space: the clamp)
// with u the image in [0, 1] and a_t = sqrt(alphas_cumprod[t]). Registered in C++ (not with
// torch.library.register_autograd) so that a call that needs no gradient pays no Python.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "noise_common.h"

namespace bpo_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using NoiseOpSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, c10::optional<at::ArrayRef<double>>,
                              c10::optional<at::ArrayRef<double>>, bool,
                              c10::optional<at::ScalarType>, c10::optional<int64_t>, int64_t,
                              c10::optional<at::Generator>);

struct DiffusionNoiseFunction : public torch::autograd::Function<DiffusionNoiseFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& images,
                            const at::Tensor& timesteps, const at::Tensor& sqrt_ab,
                            const at::Tensor& sqrt_1mab, c10::optional<at::ArrayRef<double>> mean,
                            c10::optional<at::ArrayRef<double>> std_, bool pixel_space,
                            c10::optional<at::ScalarType> out_dtype, c10::optional<int64_t> seed,
                            int64_t offset, c10::optional<at::Generator> generator) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("bpo_fast::diffusion_noise", "")
                         .typed<NoiseOpSig>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(images, timesteps, sqrt_ab, sqrt_1mab, mean, std_, pixel_space, out_dtype,
                    seed, offset, generator);
    }
    if (images.requires_grad()) {
      ctx->save_for_backward({timesteps, sqrt_ab, pixel_space ? out : at::Tensor()});
      ctx->saved_data["pixel"] = pixel_space;
      ctx->saved_data["in_dtype"] = static_cast<int64_t>(images.scalar_type());
      ctx->saved_data["has_norm"] = std_.has_value();
      // The per-channel constants exactly as the kernels compute them (noise_common.h).
      std::vector<double> inv_std, lo, hi;
      if (std_.has_value()) {
        for (size_t c = 0; c < std_->size(); ++c) {
          const double sd = (*std_)[c];
          const float out_a = static_cast<float>(1.0 / sd);
          const float out_b = static_cast<float>(-(*mean)[c] / sd);
          inv_std.push_back(out_a);
          lo.push_back(out_b);
          hi.push_back(static_cast<double>(out_a + out_b));  // the fp32 sum the kernel makes
        }
      } else {
        inv_std = {1.0};
        lo = {0.0};
        hi = {1.0};
      }
      ctx->saved_data["inv_std"] = inv_std;
      ctx->saved_data["lo"] = lo;
      ctx->saved_data["hi"] = hi;
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(11);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grad_outputs[0];
    if (!grad.defined() || saved.empty()) return grads;
    const at::Tensor& ts = saved[0];
    const at::Tensor& sab = saved[1];
    // Sizes as SymInts: torch.compile / AOT autograd trace this backward with symbolic shapes.
    const c10::SymInt B = grad.sym_size(0);
    const c10::SymInt K = ts.dim() == 2 ? ts.sym_size(1) : c10::SymInt(1);
    const c10::SymInt C = grad.sym_size(-3), H = grad.sym_size(-2), W = grad.sym_size(-1);
    // Per-channel constants as Scalars, one channel slice at a time: a tensor made from host
    // data (at::tensor) cannot be traced by torch.compile's fake tensors.
    const auto inv_std = ctx->saved_data["inv_std"].toDoubleVector();
    at::Tensor g = grad.to(at::kFloat).reshape_symint({B, K, C, H, W});
    const at::Tensor t = at::clamp(ts.reshape({-1}), 0, c10::Scalar(sab.sym_numel() - 1));
    g = g * sab.index_select(0, t).view_symint({B, K, 1, 1, 1});
    if (ctx->saved_data["pixel"].toBool()) {
      // Where the kernel clamped v to 0 or 1 it wrote exactly lo / hi (rounded to out's dtype;
      // a Python-float-like Scalar compared with a bf16/fp16 tensor is rounded the same way).
      const at::Tensor out = saved[2].reshape_symint({B, K, C, H, W});
      const auto lo = ctx->saved_data["lo"].toDoubleVector();
      const auto hi = ctx->saved_data["hi"].toDoubleVector();
      const bool per_channel = ctx->saved_data["has_norm"].toBool();
      for (int64_t c = 0; c < (per_channel ? static_cast<int64_t>(lo.size()) : 1); ++c) {
        const at::Tensor oc = per_channel ? out.select(2, c) : out;
        at::Tensor gc = per_channel ? g.select(2, c) : g;
        gc.mul_(at::logical_and(oc > lo[c], oc < hi[c]));
      }
    }
    at::Tensor gx = g.sum(1);
    if (ctx->saved_data["has_norm"].toBool()) {
      for (int64_t c = 0; c < static_cast<int64_t>(inv_std.size()); ++c) gx.select(1, c).mul_(inv_std[c]);
    }
    grads[0] = gx.to(static_cast<at::ScalarType>(ctx->saved_data["in_dtype"].toInt()));
    return grads;
  }
};

at::Tensor diffusion_noise_autograd(const at::Tensor& images, const at::Tensor& timesteps,
                                    const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1mab,
                                    c10::optional<at::ArrayRef<double>> mean,
                                    c10::optional<at::ArrayRef<double>> std_, bool pixel_space,
                                    c10::optional<at::ScalarType> out_dtype,
                                    c10::optional<int64_t> seed, int64_t offset,
                                    c10::optional<at::Generator> generator) {
  return DiffusionNoiseFunction::apply(images, timesteps, sqrt_ab, sqrt_1mab, mean, std_,
                                       pixel_space, out_dtype, seed, offset, generator);
}

}  // namespace
}  // namespace bpo_fast

TORCH_LIBRARY_IMPL(bpo_fast, Autograd, m) {
  m.impl("diffusion_noise", &bpo_fast::diffusion_noise_autograd);
}
