// Classification tasks for the encoder (docs/lra.md): sequences of tokens with one label each,
// in fixed train / validation / test splits, addressed by index so that every run (and every
// rank) sees the same examples.
//   listops  the Long Range Arena ListOps task: nested [MAX [MIN [MED [SM (sum mod 10) over
//            digits, 10 classes; generated in-process by LRA's grammar (max depth 10, up to 10
//            arguments, each node an operator with probability 0.25) and length distribution
//            (rejection to lengths in (seq/4, seq); LRA: seq 2000), tokens as LRA's pipeline
//            feeds them (no parentheses); 96,000 / 2,000 / 2,000 examples as LRA.
//   fmnist   Fashion-MNIST as a sequence of 784 pixel intensities (tokens 0..255), 10 classes, read
//            from Debian's dataset-fashion-mnist (LINMIX_FMNIST_DIR overrides the directory): train =
//            the first 55,000 training images, validation = the last 5,000, test = the 10,000 test
//            images.
//   order    which of two marker tokens comes first in a string of random digits (lengths in
//            [seq/2, seq]), 2 classes: position is all that matters, anywhere in the sequence.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace linmix {

enum class Split { Train, Val, Test };
Split parse_split(const std::string& s);  // "train" | "val" | "test"
const char* split_name(Split s);

// B sequences padded (token 0) to T = the task's seq, their lengths and labels.
struct ClassBatch {
  int64_t B = 0, T = 0;
  std::vector<int32_t> inputs, lengths, labels;
};

class ClassTask {
 public:
  virtual ~ClassTask() = default;
  virtual std::string name() const = 0;
  virtual int64_t vocab() const = 0;    // token ids are in [0, vocab); 0 is the padding
  virtual int64_t classes() const = 0;
  virtual int64_t seq() const = 0;      // the longest sequence (every batch is padded to it)
  virtual int64_t size(Split s) const = 0;
  // Example i of split s (0 <= i < size(s)): its tokens (1..seq of them) and label.
  virtual void example(Split s, int64_t i, std::vector<int32_t>& tokens, int32_t& label) const = 0;
};

bool is_class_task(const std::string& name);  // listops, fmnist, order
// seq 0: the task's default (listops 512, fmnist 784, order 256). Throws Error for an unknown
// name, a seq the task cannot take, or (fmnist) missing / corrupt data files.
std::unique_ptr<ClassTask> make_class_task(const std::string& name, int64_t seq = 0);
ClassBatch class_batch(const ClassTask& task, Split s, const std::vector<int64_t>& indices);

// ListOps' tokens and value (exposed for tests): 0 pad, 1..10 the digits 0..9, 11 [MIN, 12 [MAX,
// 13 [MED, 14 [SM, 15 ]. listops_value evaluates a well-formed expression (Error otherwise):
// MED is LRA's int(np.median): the lower-middle and upper-middle mean, rounded down.
int32_t listops_value(const std::vector<int32_t>& tokens);
std::string listops_text(const std::vector<int32_t>& tokens);  // "[MAX 2 9 [MIN 4 7 ] 0 ]"

}  // namespace linmix
