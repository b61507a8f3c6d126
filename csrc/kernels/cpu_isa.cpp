#include "kernels/cpu_isa.h"

namespace mpq {
namespace kernels {

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

}  // namespace kernels
}  // namespace mpq
