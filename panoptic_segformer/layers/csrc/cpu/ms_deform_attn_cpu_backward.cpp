// CPU backward of multi-scale deformable attention: the operator wrapper (kernels in
// ms_deform_attn_cpu_kernels.inc).  grad_value is accumulated in place for float/double
// with one query chunk per (n, head); otherwise in a float/double (K, N, S, M, D) buffer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "ms_deform_attn_cpu.h"

namespace panoptic_segformer {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const char* op = "panoptic_segformer::ms_deform_attn_backward (CPU)";
  std::vector<Level> levels;
  const Sizes z = check_and_read_levels(op, value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights, levels);
  TORCH_CHECK(grad_output.device().is_cpu(), op, ": grad_output must be a CPU tensor, got one on ",
              grad_output.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), op, ": grad_output must have the dtype of value (",
              value.scalar_type(), "), got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == z.n && grad_output.size(1) == z.lq &&
                  grad_output.size(2) == z.m * z.d,
              op, ": grad_output must be (N=", z.n, ", Lq=", z.lq, ", M*D=", z.m * z.d, "), got shape ",
              grad_output.sizes());
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  const at::Tensor go = grad_output.contiguous();
  at::Tensor grad_value = at::zeros_like(v);
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (attn.numel() == 0 || v.numel() == 0) {
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  const int64_t nm = z.n * z.m;
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(z.lq, (threads + nm - 1) / nm));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool direct = chunks == 1 && std::is_same<acc_t, scalar_t>::value;
    at::Tensor acc = direct ? grad_value
                            : at::zeros({chunks, z.n, z.s, z.m, z.d},
                                        v.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    PSF_DISPATCH_LOC_TYPE(scalar_t, loc.scalar_type(), [&] {
      backward_dispatch<scalar_t, loc_t>(v.const_data_ptr<scalar_t>(), loc.const_data_ptr<loc_t>(),
                                         attn.const_data_ptr<loc_t>(), go.const_data_ptr<scalar_t>(),
                                         static_cast<acc_t*>(acc.mutable_data_ptr()),
                                         grad_loc.mutable_data_ptr<loc_t>(), grad_attn.mutable_data_ptr<loc_t>(), z,
                                         levels, chunks);
    });
    if (!direct) grad_value.copy_(chunks == 1 ? acc.select(0, 0) : acc.sum(0));
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(panoptic_segformer, CPU, m) {
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace cpu
}  // namespace panoptic_segformer
