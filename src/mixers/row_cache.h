// A state that is the last rows of per-token inputs: a key/value cache (softmax, block_softmax,
// aft_full). Every form from such a state is the mechanism's stateless form over the
// concatenation [cache rows; the call's rows] (an input the cache does not hold, such as q, gets
// zero rows there), the outputs of the cache rows dropped; the final state is the last keep(n)
// rows of the concatenation (n = L + T). The backward is the stateless backward over the
// concatenation with dy = 0 on the cache rows: the final state's gradient joins the rows it
// copies, and the cache rows' gradient is the initial state's. The mechanism keeps one
// reference, one parallel form and one backward; the state costs a concatenation (only when a
// state is given) and the final rows' copy (only when the final state is wanted).
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "linmix/mixer.h"

namespace linmix {

struct RowCache {
  std::vector<std::pair<std::string, std::string>> rows;  // state tensor (spec.state order) -> the input it caches
  std::function<int64_t(const Call&, int64_t n)> keep;     // rows of the final cache after n rows
};

// Installs on s, after its stateless forms (set_reference, parallel, backward): state_all_modes,
// final_dims ("L" of the final state), and the forms' wrappers described above.
void set_row_cache(MixerSpec& s, RowCache rc);

}  // namespace linmix
