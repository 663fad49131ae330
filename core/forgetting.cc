#include "core/forgetting.h"

#include <algorithm>
#include <cmath>

namespace peerd {

ForgettingMetrics ComputeForgettingMetrics(const ForgettingInput& in) {
  ForgettingMetrics m;
  const size_t tasks = in.trained_at.size();
  m.forgetting.assign(tasks, NAN);
  if (in.rows.empty()) return m;
  const size_t T = in.rows.size() - 1;
  auto score = [&](size_t row, size_t task) { return task < in.rows[row].size() ? in.rows[row][task] : NAN; };

  double acc = 0, f_sum = 0, bwt_sum = 0, fwt_sum = 0;
  int acc_n = 0, f_n = 0, bwt_n = 0, fwt_n = 0;
  for (size_t j = 0; j < tasks; ++j) {
    const double now = score(T, j);
    if (std::isnan(now)) continue;
    acc += now;
    ++acc_n;
    const int t = in.trained_at[j];
    if (t < 0 || static_cast<size_t>(t) >= T) {
      // Never trained, or trained last: no forgetting or backward transfer to speak of yet.
    } else {
      double best = INFINITY;
      for (size_t l = 0; l < T; ++l)
        if (!std::isnan(score(l, j))) best = std::min(best, score(l, j));
      m.forgetting[j] = now - best;
      f_sum += now - best;
      ++f_n;
      if (!std::isnan(score(t, j))) {
        bwt_sum += score(t, j) - now;
        ++bwt_n;
      }
    }
    const int b = j < in.before_trained.size() ? in.before_trained[j] : t - 1;
    if (t >= 0 && in.init >= 0 && b > in.init) {
      const double untrained = score(in.init, j), before = score(b, j);
      if (!std::isnan(untrained) && !std::isnan(before)) {
        fwt_sum += untrained - before;
        ++fwt_n;
      }
    }
  }
  m.acc = acc_n ? acc / acc_n : 0;
  m.mean_forgetting = f_n ? f_sum / f_n : 0;
  m.bwt = bwt_n ? bwt_sum / bwt_n : 0;
  m.fwt = fwt_n ? fwt_sum / fwt_n : 0;
  return m;
}

}  // namespace peerd
