// The k largest scores of each row: the retrieval's top-k per sub-key half, 65,536 rows a step
// (4,096 tokens × 8 heads × 2 halves) of n = √N scores (256 at 65k experts, 1,024 at 1M).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace peerd::kernels::cpu {

// Scratch for TopKRows, one per thread.
struct TopKScratch {
  std::vector<float> maxima, group_maxima, contenders, values;
  std::vector<int64_t> ids;
  std::vector<int32_t> ids32;
  std::vector<std::pair<float, int64_t>> sorted;
};

// For rows [begin, end) of scores [M, n], row-major, 1 ≤ k ≤ n: the k largest of each row,
// descending, ties to the lower index, into val and ids [M, k]. NaN counts as below every number
// (a row with fewer than k numbers is filled with -inf). The same result on every CPU.
void TopKRows(const float* scores, int64_t n, int64_t k, int64_t begin, int64_t end, float* val, int64_t* ids,
              TopKScratch& scratch);

}  // namespace peerd::kernels::cpu
