// CPU forward of multi-scale deformable attention: the operator wrapper (kernels in
// ms_deform_attn_cpu_kernels.inc).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "ms_deform_attn_cpu.h"

namespace panoptic_segformer {
namespace cpu {
namespace {

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  std::vector<Level> levels;
  const Sizes z = check_and_read_levels("panoptic_segformer::ms_deform_attn_forward (CPU)", value, spatial_shapes,
                                        level_start_index, sampling_locations, attention_weights, levels);
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor attn = attention_weights.contiguous();
  at::Tensor out = at::empty({z.n, z.lq, z.m * z.d}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    PSF_DISPATCH_LOC_TYPE(scalar_t, loc.scalar_type(), [&] {
      forward_dispatch<scalar_t, loc_t>(v.const_data_ptr<scalar_t>(), loc.const_data_ptr<loc_t>(),
                                        attn.const_data_ptr<loc_t>(), out.mutable_data_ptr<scalar_t>(), z, levels);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(panoptic_segformer, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
}

}  // namespace cpu
}  // namespace panoptic_segformer
