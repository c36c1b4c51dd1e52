// Argument checks of the CPU kernels.  The Python API validates first with clearer
// ValueError/TypeError messages; these TORCH_CHECKs keep direct op calls memory-safe.
#include "ms_deform_attn_cpu.h"

namespace panoptic_segformer {
namespace cpu {

Sizes check_and_read_levels(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, std::vector<Level>& levels) {
  const std::pair<const char*, const at::Tensor*> args[] = {{"value", &value},
                                                             {"spatial_shapes", &spatial_shapes},
                                                             {"level_start_index", &level_start_index},
                                                             {"sampling_locations", &sampling_locations},
                                                             {"attention_weights", &attention_weights}};
  for (const auto& [name, t] : args) {
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t->device());
  }
  TORCH_CHECK(value.dim() == 4, op, ": value must be 4-d (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be (L, 2), got shape ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == spatial_shapes.size(0), op,
              ": level_start_index must be (L,) with L = ", spatial_shapes.size(0), ", got shape ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, op, ": sampling_locations must be 6-d (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, op, ": attention_weights must be 5-d (N, Lq, M, L, P), got shape ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, op, ": spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, op, ": level_start_index must be int64, got ",
              level_start_index.scalar_type());
  const auto vt = value.scalar_type(), lt = sampling_locations.scalar_type();
  const bool reduced = vt == at::kHalf || vt == at::kBFloat16;
  TORCH_CHECK(vt == at::kFloat || vt == at::kDouble || reduced, op,
              ": value must be float32, float64, float16 or bfloat16, got ", vt);
  TORCH_CHECK(lt == vt || (reduced && lt == at::kFloat), op, ": sampling_locations must have the dtype of value (",
              vt, reduced ? ") or float32" : ")", ", got ", lt);
  TORCH_CHECK(attention_weights.scalar_type() == lt, op,
              ": attention_weights must have the dtype of sampling_locations (", lt, "), got ",
              attention_weights.scalar_type());
  Sizes z{value.size(0), value.size(1), value.size(2), value.size(3),
          sampling_locations.size(1), spatial_shapes.size(0), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == z.n && sampling_locations.size(2) == z.m &&
                  sampling_locations.size(3) == z.l && sampling_locations.size(5) == 2,
              op, ": sampling_locations must be (N=", z.n, ", Lq, M=", z.m, ", L=", z.l, ", P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), op,
              ": attention_weights must be (N, Lq, M, L, P) = ", sampling_locations.sizes().slice(0, 5),
              ", got shape ", attention_weights.sizes());

  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* sh = shapes.const_data_ptr<int64_t>();
  const int64_t* st = starts.const_data_ptr<int64_t>();
  levels.resize(z.l);
  for (int64_t l = 0; l < z.l; ++l) {
    const Level lv{sh[2 * l], sh[2 * l + 1], st[l]};
    TORCH_CHECK(lv.h > 0 && lv.w > 0, op, ": spatial_shapes[", l, "] must be positive, got (", lv.h, ", ", lv.w, ")");
    int64_t area = 0;
    TORCH_CHECK(!__builtin_mul_overflow(lv.h, lv.w, &area), op, ": spatial_shapes[", l, "] = (", lv.h, ", ", lv.w,
                "): H*W overflows int64");
    TORCH_CHECK(lv.start >= 0 && lv.start <= z.s && area <= z.s - lv.start, op, ": level ", l, " (start ",
                lv.start, ", ", lv.h, "x", lv.w, ") exceeds S = ", z.s);
    levels[l] = lv;
  }
  return z;
}

}  // namespace cpu
}  // namespace panoptic_segformer
