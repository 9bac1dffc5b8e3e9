// The CUDA backend's launch plan: the program counts, the partial rows' widths and sums, and the probe's
// scratch that bindings.cpp allocates around the kernels. Compiled into the extension (bindings.cpp)
// and into the host layer (host/host_api.cpp exports it with C linkage), so that cuda-host-check runs
// the extension's own arithmetic, not a copy of it. Free of torch headers.
#pragma once

#include <algorithm>
#include <cstdint>

namespace acn::plan {

// Programs of a norm backward that reduces dweight/dbias: two per SM, at most one per row; a fixed
// count per device and shape, so that the partial rows' sum is bitwise repeatable.
inline int reduction_programs(int64_t rows, int sms) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 2 * static_cast<int64_t>(sms))));
}

// The partial rows of a norm backward, float32 (programs, width): each block writes dweight's D sums at
// column 0, dbias's at D, then the hybrid's dgate and dlong_weight; one launch sums them all. With
// scalars the width is padded to 8 floats (32-byte aligned rows); the padding is never written.
inline int64_t partial_width(int64_t dim, bool has_bias, int scalars) {
  const int64_t width = (has_bias ? 2 : 1) * dim + scalars;
  return scalars ? (width + 7) / 8 * 8 : width;
}

// The columns of those partial rows that hold sums (the padding left out of the sum).
inline int64_t partial_sums(int64_t dim, bool has_bias, int scalars) { return (has_bias ? 2 : 1) * dim + scalars; }

// The float rows a probe block keeps: the running sum as a compensated pair (forward), and the running
// gradient and the dweight/dbias partial sums beside it (backward).
inline int64_t probe_storage_floats(int dim, bool backward) { return (backward ? 5 : 2) * static_cast<int64_t>(dim); }

// Where they live: in the device's opt-in shared memory where they fit (0), else in global scratch,
// programs slices of this many floats.
inline int64_t probe_scratch_floats(int dim, bool backward, int64_t shared_opt_in_bytes) {
  const int64_t floats = probe_storage_floats(dim, backward);
  return 4 * floats <= shared_opt_in_bytes ? 0 : floats;
}

}  // namespace acn::plan
