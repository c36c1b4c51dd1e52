// Argument checks of the CPU kernels.  The Python API validates first with clearer
// ValueError/TypeError messages; these TORCH_CHECKs keep direct op calls memory-safe.
#include "ms_deform_attn_cpu.h"

namespace panoptic_segformer {
namespace cpu {

Sizes check_and_read_levels(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, std::vector<Level>& levels) {
  TORCH_CHECK(value.dim() == 4, "value must be 4-d (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0),
              "level_start_index must be (L,), got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, "sampling_locations must be 6-d (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be 5-d (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share one dtype");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn CPU kernel got a tensor on ", t->device());
  }
  Sizes z{value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), spatial_shapes.size(0), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == z.n && sampling_locations.size(2) == z.m &&
                  sampling_locations.size(3) == z.l && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be (N, Lq, M, L, P), got ", attention_weights.sizes());

  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  levels.resize(z.l);
  for (int64_t l = 0; l < z.l; ++l) {
    const Level lv{sh[2 * l], sh[2 * l + 1], st[l]};
    TORCH_CHECK(lv.h > 0 && lv.w > 0, "spatial_shapes[", l, "] must be positive, got (", lv.h, ", ", lv.w, ")");
    TORCH_CHECK(lv.start >= 0 && lv.h <= z.s && lv.w <= z.s && lv.h * lv.w <= z.s - lv.start,
                "level ", l, " (start ", lv.start, ", ", lv.h, "x", lv.w, ") exceeds S = ", z.s);
    levels[l] = lv;
  }
  return z;
}

}  // namespace cpu
}  // namespace panoptic_segformer
