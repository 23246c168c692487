// GRU4Rec training (and evaluation) steps as Paddle custom CPU operators.
//
// A dygraph training step of GRU4Rec is some 60 small Paddle operators (gathers, a GRU
// cell, a B x (B + n_sample) score matrix, the loss, their backward passes and a
// row-sparse optimizer update per parameter). At batch 32 the arithmetic takes well
// under a millisecond while the per-operator overhead takes several: this operator runs
// a whole batch of session-parallel steps (forward, loss, backward and update) in one
// call, with the large products done by MKL's sgemm (shipped inside the paddlepaddle
// wheel) and exponentials by MKL's vsExp.
//
// The arithmetic is that of model.py's reference step (Paddle operators with autograd);
// tests/test_fused_kernel.py holds the two to the same parameters after training.
//
// Parameters and optimizer slots are updated in place (this operator owns the training
// state's memory for the duration of the call; the Python side never reads the tensors
// concurrently). Layout of `params` (model.py GRU4RecNet.param_names):
//   [input_emb]  (embedding == separate)
//   per layer l: w_ih [in, 3h], w_hh [h, 3h], b_ih [3h], b_hh [3h]   (gates r, z, candidate)
//   item_emb [n_items, d], item_bias [n_items]
// `slots`: for every parameter its Adagrad accumulator (optimizer adagrad), then for every
// parameter its momentum buffer (when momentum > 0).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "paddle/extension.h"

extern "C" {
void cblas_sgemm(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void vsExp(int n, const float* a, float* y);
void vsTanh(int n, const float* a, float* y);
int MKL_Set_Num_Threads_Local(int n);
int MKL_Get_Max_Threads();
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
enum Embedding { kShared = 0, kSeparate = 1, kOneHot = 2 };
enum Loss { kCrossEntropy = 0, kBprMax = 1, kTop1Max = 2, kFullSoftmax = 3 };
enum Optimizer { kAdagrad = 0, kSgd = 1 };
constexpr float kAdagradEps = 1e-6f;

// C[m, n] = op(A) op(B) + beta * C, row-major
void gemm(bool ta, bool tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc,
          float beta = 0.f) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (beta == 0.f)
      for (int i = 0; i < m; ++i) std::memset(c + (int64_t)i * ldc, 0, sizeof(float) * n);
    return;
  }
  cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.f, a, lda, b, ldb, beta, c, ldc);
}

// MKL threads for this operator only, restored on exit (also when a check throws).
struct MklThreads {
  int previous;
  explicit MklThreads(int n) : previous(MKL_Set_Num_Threads_Local(n)) {}
  ~MklThreads() { MKL_Set_Num_Threads_Local(previous); }
};

// Threads: the operators split their work over `team_size()` threads (OMP_NUM_THREADS, which
// paddlerec.run sets from the phases' thread_num), each calling single-threaded MKL. Work is cut
// into tiles whose shapes do not depend on the thread count (kColTile columns, kEvalRows rows),
// each tile computed by one thread and partial sums combined in tile order: results are
// bitwise identical for any thread count. (MKL's own threading may split a summed dimension and
// change the rounding from run to run.)
constexpr int kMaxThreads = 256;
constexpr int64_t kColTile = 128;  // output columns (items) per tile
constexpr int64_t kEvalRows = 64;  // evaluation rows per tile (scored against every item)
constexpr int64_t kRowTile = 16;   // training rows per tile (the GRU's elementwise work, forward and backward)
constexpr int64_t kChunk = 4096;   // elements per task of an elementwise (dense) update

int team_size() { return std::max(1, std::min(kMaxThreads, MKL_Get_Max_Threads())); }

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Helper threads for the whole process, started on first use. A job is a number of tasks; each
// thread owns a contiguous share of them (the same share in consecutive phases of a step, so the
// rows a thread wrote tend to stay in its cache) and claims its tasks one at a time from the
// front of its share, then from the other shares. A helper that is not running (the machine is
// busy) simply claims nothing, and the caller waits only for tasks already claimed — never for a
// thread to wake up. Between jobs helpers spin for a short while (a step has several parallel
// phases a few microseconds apart; waking a parked thread costs tens of microseconds), then park
// on a condition variable.
class Team {
 public:
  static Team& get() {
    static Team* team = new Team();  // never destroyed: parked threads end with the process
    return *team;
  }
  // threads that may run tasks: helpers started so far plus the caller (member ids 0 .. this - 1)
  int capacity() const { return started_ + 1; }
  // start helpers so that `members` threads may share the next jobs
  void ensure(int members) {
    std::lock_guard<std::mutex> one_caller(caller_);
    while (started_ < members - 1 && !stopping_.load(std::memory_order_acquire)) {
      // a new thread waits for the job after the current one, however late it starts
      const int id = ++started_;
      const uint64_t current = generation_.load(std::memory_order_relaxed);
      alive_.fetch_add(1, std::memory_order_acq_rel);
      std::thread([this, id, current] { loop(id, current); }).detach();
    }
  }
  // At exit (or when the library is unloaded): let the helpers leave their loops before this
  // code goes away — a helper still spinning in unmapped code would crash the exiting process.
  void shutdown() {
    stopping_.store(true, std::memory_order_release);
    { std::lock_guard<std::mutex> lock(m_); }
    wake_.notify_all();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
    while (alive_.load(std::memory_order_acquire) > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::yield();
  }

  // work(task, member) for every task in [0, tasks), on up to `members` threads (the caller is
  // member 0); returns when all tasks are done
  void run(int members, int64_t tasks, const std::function<void(int64_t, int)>& work) {
    std::lock_guard<std::mutex> one_caller(caller_);
    members = std::min(members, kMaxThreads);
    const uint64_t job = generation_.load(std::memory_order_relaxed) + 1;
    work_ = &work;
    members_.store(members, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);
    for (int m = 0; m < members; ++m) {
      shares_[m].end.store(tasks * (m + 1) / members, std::memory_order_relaxed);
      shares_[m].claim.store((job << 32) | (uint64_t)(tasks * m / members), std::memory_order_release);
    }
    generation_.store(job, std::memory_order_release);
    if (parked_.load(std::memory_order_acquire) > 0) {
      { std::lock_guard<std::mutex> lock(m_); }  // a helper between its check and its wait sees the change
      wake_.notify_all();
    }
    const int64_t mine = drain(job, 0, members);
    for (int spins = 0; finished_.load(std::memory_order_acquire) + mine < tasks; ++spins) {
      if (spins < 4096)
        cpu_relax();
      else
        std::this_thread::yield();
    }
  }

 private:
  // One thread's share of a job: tasks claim .. end (the claim word carries the job's number).
  struct alignas(64) Share {
    std::atomic<uint64_t> claim{0};  // (job << 32) | next unclaimed task
    std::atomic<int64_t> end{0};
  };

  // claim and run tasks of `job`, own share first, until none is left; returns how many ran here
  int64_t drain(uint64_t job, int member, int members) {
    int64_t ran = 0;
    for (int k = 0; k < members; ++k) {
      Share& share = shares_[(member + k) % members];
      for (;;) {
        uint64_t c = share.claim.load(std::memory_order_acquire);
        // another job's share (a stale `members`), or this share is used up
        if ((c >> 32) != job || (int64_t)(c & 0xffffffffu) >= share.end.load(std::memory_order_relaxed)) break;
        // a successful claim of an unclaimed task of `job` proves the job is still running: work_
        // is its function (a stale `end` read only lets a claim be tried, which then fails)
        if (!share.claim.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
        (*work_)((int64_t)(c & 0xffffffffu), member);
        ++ran;
      }
    }
    return ran;
  }
  void loop(int id, uint64_t seen) {
    MKL_Set_Num_Threads_Local(1);
    for (;;) {
      uint64_t now;
      auto since = std::chrono::steady_clock::now();
      for (int spins = 1; (now = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
        if (stopping_.load(std::memory_order_acquire)) {
          alive_.fetch_sub(1, std::memory_order_acq_rel);
          return;
        }
        if (spins % 256 == 0 && std::chrono::steady_clock::now() - since > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lock(m_);
          parked_.fetch_add(1, std::memory_order_acq_rel);
          wake_.wait(lock, [&] {
            return generation_.load(std::memory_order_acquire) != seen || stopping_.load(std::memory_order_acquire);
          });
          parked_.fetch_sub(1, std::memory_order_acq_rel);
        } else {
          cpu_relax();
        }
      }
      seen = now;
      const int members = members_.load(std::memory_order_relaxed);
      if (id < members) {
        const int64_t ran = drain(now, id, members);
        if (ran) finished_.fetch_add(ran, std::memory_order_acq_rel);
      }
    }
  }
  std::mutex caller_, m_;
  std::condition_variable wake_;
  const std::function<void(int64_t, int)>* work_ = nullptr;
  std::atomic<int> members_{0};
  int started_ = 0;
  alignas(64) std::atomic<uint64_t> generation_{0};
  alignas(64) std::atomic<int64_t> finished_{0};
  std::atomic<int> parked_{0}, alive_{0};
  std::atomic<bool> stopping_{false};
  Share shares_[kMaxThreads];
};

// Its destructor runs at exit and when the library is unloaded (static objects of this library
// are destroyed then), while the Team itself is never destroyed.
struct TeamShutdown {
  ~TeamShutdown() { Team::get().shutdown(); }
} team_shutdown;

// task(t, member) for t in [0, tasks) on up to `members` threads; member < Team capacity()
template <class F>
void parallel_for(int members, int64_t tasks, F task) {
  if (tasks <= 0) return;
  if (members <= 1 || tasks == 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t, 0);
    return;
  }
  const std::function<void(int64_t, int)> work = [&](int64_t t, int m) { task(t, m); };
  Team::get().run(std::min<int64_t>(members, tasks), tasks, work);
}

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Inverted dropout with counter-based masks: element k of row i of mask `slot` (0: the input
// embedding, 1 + l: layer l's output) is kept iff a hash of (step key, slot, row, k) says so, so
// any thread can draw any row's mask and the masks do not depend on the thread count.
// mask holds 0 or 1/(1-p); x *= mask, rows [r0, r1) of a [n, width] matrix.
void dropout_rows(float* x, float* mask, int width, int64_t r0, int64_t r1, float p, uint64_t step_key, uint64_t slot) {
  const float keep_scale = 1.f / (1.f - p);
  for (int64_t i = r0; i < r1; ++i)
    for (int k = 0; k < width; ++k) {
      const uint64_t element = (slot << 40) | ((uint64_t)i << 20) | (uint64_t)k;
      const float u = (mix64(step_key + element * 0x9E3779B97F4A7C15ULL) >> 40) * (1.0f / 16777216.0f);
      const int64_t e = i * width + k;
      mask[e] = u >= p ? keep_scale : 0.f;
      x[e] *= mask[e];
    }
}

float* mut(const paddle::Tensor& t) { return const_cast<float*>(t.data<float>()); }

// Gradient rows of an item-indexed parameter, coming from several sources (output columns,
// inputs) and merged per distinct item before the update: the update is not linear in the
// gradient, so repeated rows must be summed first, as the official code does. The sources of an
// item are summed in the order they were added, by whichever thread updates that item, so the
// result does not depend on the thread count.
struct SparseRows {
  int width = 0;
  std::vector<int32_t> slot_of;        // item -> slot, or -1 (reset by clear())
  std::vector<int64_t> items;          // slot -> item
  std::vector<int32_t> source_slot;    // per source: its slot
  std::vector<const float*> sources;   // per source: its gradient row (width floats)
  std::vector<int32_t> start, order, cursor;  // sources of slot s: order[start[s] .. start[s + 1])

  void begin(int64_t n_items, int w) {
    width = w;
    if ((int64_t)slot_of.size() != n_items) slot_of.assign(n_items, -1);
    clear();
  }
  void add(int64_t item, const float* grad) {
    int32_t s = slot_of[item];
    if (s < 0) {
      s = slot_of[item] = (int32_t)items.size();
      items.push_back(item);
    }
    source_slot.push_back(s);
    sources.push_back(grad);
  }
  // a stable counting sort of the sources by slot
  void finish() {
    const int64_t n_slots = (int64_t)items.size();
    start.assign(n_slots + 1, 0);
    for (int32_t s : source_slot) ++start[s + 1];
    for (int64_t s = 0; s < n_slots; ++s) start[s + 1] += start[s];
    cursor.assign(start.begin(), start.end() - 1);
    order.resize(source_slot.size());
    for (size_t k = 0; k < source_slot.size(); ++k) order[cursor[source_slot[k]]++] = (int32_t)k;
  }
  // the gradient of slot s: a source row itself when it has one source, else the sum into `sum`
  const float* gradient(int64_t s, float* sum) const {
    const int32_t lo = start[s], hi = start[s + 1];
    if (hi - lo == 1) return sources[order[lo]];
    std::memcpy(sum, sources[order[lo]], sizeof(float) * width);
    for (int32_t k = lo + 1; k < hi; ++k) {
      const float* g = sources[order[k]];
      for (int c = 0; c < width; ++c) sum[c] += g[c];
    }
    return sum;
  }
  void clear() {
    for (int64_t item : items) slot_of[item] = -1;
    items.clear();
    source_slot.clear();
    sources.clear();
  }
};

inline void prefetch_row(const float* row, int width) {
  for (int c = 0; c < width; c += 16) __builtin_prefetch(row + c);
}

struct Update {
  int kind;
  float lr, momentum;
  // p += step(g) over one contiguous range; acc (adagrad) and mom (momentum > 0) may be null
  inline void apply(float* __restrict p, const float* __restrict g, float* __restrict acc, float* __restrict mom,
                    int64_t size) const {
    const float lr_ = lr, mu = momentum;
    if (kind == kAdagrad) {
      if (mom) {
#pragma GCC ivdep
        for (int64_t i = 0; i < size; ++i) {
          const float a = acc[i] + g[i] * g[i];
          acc[i] = a;
          const float m = mom[i] * mu - lr_ * g[i] / std::sqrt(a + kAdagradEps);
          mom[i] = m;
          p[i] += m;
        }
      } else {
#pragma GCC ivdep
        for (int64_t i = 0; i < size; ++i) {
          const float a = acc[i] + g[i] * g[i];
          acc[i] = a;
          p[i] -= lr_ * g[i] / std::sqrt(a + kAdagradEps);
        }
      }
    } else {
      if (mom) {
#pragma GCC ivdep
        for (int64_t i = 0; i < size; ++i) {
          const float m = mom[i] * mu - lr_ * g[i];
          mom[i] = m;
          p[i] += m;
        }
      } else {
#pragma GCC ivdep
        for (int64_t i = 0; i < size; ++i) p[i] -= lr_ * g[i];
      }
    }
  }
};

struct Param {
  float* value = nullptr;
  float* acc = nullptr;
  float* mom = nullptr;
  int64_t size = 0;
};

struct Layer {
  int in = 0, h = 0;
  int w_ih = 0, w_hh = 0, b_ih = 0, b_hh = 0;  // indexes into params
  // offsets of this layer's gradients in the flat dense gradient (g_w_ih -1: w_ih is the
  // one-hot input table, a sparse parameter)
  int64_t g_w_ih = -1, g_w_hh = 0, g_b_ih = 0, g_b_hh = 0;
  // per step: this layer's input rows [n, in] (null: one-hot input), then [n, h] / [n, 3h] buffers
  const float* x = nullptr;
  std::vector<float> h_in, gi, gh, r, z, c, out, mask, dgi, dgh, d_in;

  void resize(int64_t n, bool training) {
    const int64_t nh = n * h, nh3 = n * 3 * h;
    gi.resize(nh3);
    gh.resize(nh3);
    h_in.resize(nh);
    r.resize(nh);
    z.resize(nh);
    c.resize(nh);
    out.resize(nh);
    if (training) {
      dgi.resize(nh3);
      dgh.resize(nh3);
      d_in.resize(n * in);
    }
  }
};

// One piece of the update: a chunk of a dense parameter, or a block of a sparse one's rows.
struct UpdateTask {
  const Param* param;
  const float* grad;   // dense: the parameter's whole gradient; sparse: null
  SparseRows* rows;    // sparse: the gathered rows; dense: null
  int64_t lo, hi;      // dense: element range; sparse: slot range
};

void check_ids(const int64_t* ids, int64_t n, int64_t n_items, const char* what) {
  for (int64_t i = 0; i < n; ++i)
    PD_CHECK(ids[i] >= 0 && ids[i] < n_items, what, " holds item id ", ids[i], " outside [0, ", n_items, ")");
}

// Row loss and d(loss)/d(scores) for the sampled losses; row i's target is column `target`.
// `row` holds the products x . o_j; offset[j] (the item bias, less the logQ correction for
// cross-entropy) is added here rather than copied into every row before the product.
// Column j stands for w[j] identical columns (a negative drawn w[j] times; w == null: all 1),
// so sums over columns are weighted by w and the gradient written for column j is that of all
// its copies together. Writes the gradient into `row` (in place) already multiplied by
// `scale`; returns the loss.
float cross_entropy_row(float* row, int64_t cols, int64_t target, const float* offset, const float* w, float* tmp,
                        float scale) {
  for (int64_t j = 0; j < cols; ++j) row[j] += offset[j];
  float m = row[0];
  for (int64_t j = 1; j < cols; ++j) m = std::max(m, row[j]);
  for (int64_t j = 0; j < cols; ++j) tmp[j] = row[j] - m;
  vsExp((int)cols, tmp, tmp);
  if (w)
    for (int64_t j = 0; j < cols; ++j) tmp[j] *= w[j];
  double z = 0;
  for (int64_t j = 0; j < cols; ++j) z += tmp[j];
  const float loss = (float)(std::log(z) + m - row[target]);
  const float inv = (float)(scale / z);
  for (int64_t j = 0; j < cols; ++j) row[j] = tmp[j] * inv;
  row[target] -= scale;
  return loss;
}

// BPR-max / TOP1-max with the softmax over the negatives (the target column excluded).
float ranking_row(int kind, float* row, int64_t cols, int64_t target, const float* offset, float elu, float bpreg,
                  const float* w, float* tmp, float scale) {
  for (int64_t j = 0; j < cols; ++j) row[j] += offset[j];
  // tmp: five rows of `cols`: activated scores, softmax weights, sigmoids, gradient, second sigmoids
  float* a = tmp;
  float* sm = tmp + cols;
  float* sg = tmp + 2 * cols;
  float* sq = tmp + 3 * cols;
  float* sq2 = tmp + 4 * cols;
  for (int64_t j = 0; j < cols; ++j) a[j] = row[j];
  if (elu > 0) {
    for (int64_t j = 0; j < cols; ++j) sq[j] = std::min(row[j], 0.f);
    vsExp((int)cols, sq, sq);
    for (int64_t j = 0; j < cols; ++j)
      if (row[j] <= 0) a[j] = elu * (sq[j] - 1.f);
  }
  // softmax over the non-target columns; the target column counts as 0 for the max (as the official mask does)
  const float at = a[target];
  float m = 0.f;
  for (int64_t j = 0; j < cols; ++j)
    if (j != target) m = std::max(m, a[j]);
  for (int64_t j = 0; j < cols; ++j) sm[j] = (j == target ? 0.f : a[j]) - m;
  vsExp((int)cols, sm, sm);
  if (w)
    for (int64_t j = 0; j < cols; ++j) sm[j] *= w[j];  // sm: the weight of all copies of column j together
  sm[target] = 0.f;
  double zsum = 0;
  for (int64_t j = 0; j < cols; ++j) zsum += sm[j];
  const float inv_z = (float)(1.0 / zsum);
  for (int64_t j = 0; j < cols; ++j) sm[j] *= inv_z;

  float loss = 0.f;
  if (kind == kBprMax) {
    // sg = sigmoid(a_t - a_j)
    for (int64_t j = 0; j < cols; ++j) sg[j] = a[j] - at;
    vsExp((int)cols, sg, sg);
    for (int64_t j = 0; j < cols; ++j) sg[j] = 1.f / (1.f + sg[j]);
    double p = 0, reg = 0;
    for (int64_t j = 0; j < cols; ++j) {
      p += (double)sg[j] * sm[j];
      reg += (double)a[j] * a[j] * sm[j];
    }
    const float pe = (float)p + 1e-24f;
    loss = -std::log(pe) + bpreg * (float)reg;
    double d_target = 0;
    for (int64_t j = 0; j < cols; ++j) {
      if (j == target) continue;
      d_target += (double)sm[j] * sg[j] * (1.f - sg[j]);
      sq[j] = -sm[j] * (sg[j] * sg[j] - (float)p) / pe + bpreg * sm[j] * (2.f * a[j] + a[j] * a[j] - (float)reg);
    }
    sq[target] = (float)(-d_target / pe);
  } else {
    // TOP1-max: sum_j sm_j (sigmoid(a_j - a_t) + sigmoid(a_j^2))
    for (int64_t j = 0; j < cols; ++j) sg[j] = at - a[j];
    vsExp((int)cols, sg, sg);
    for (int64_t j = 0; j < cols; ++j) sg[j] = 1.f / (1.f + sg[j]);  // sigmoid(a_j - a_t)
    for (int64_t j = 0; j < cols; ++j) sq2[j] = -a[j] * a[j];
    vsExp((int)cols, sq2, sq2);
    for (int64_t j = 0; j < cols; ++j) sq2[j] = 1.f / (1.f + sq2[j]);  // sigmoid(a_j^2)
    double l = 0;
    for (int64_t j = 0; j < cols; ++j) l += (double)sm[j] * (sg[j] + sq2[j]);
    loss = (float)l;
    double d_target = 0;
    for (int64_t j = 0; j < cols; ++j) {
      if (j == target) continue;
      const float ds = sg[j] * (1.f - sg[j]);
      const float dq = sq2[j] * (1.f - sq2[j]);
      d_target -= (double)sm[j] * ds;
      sq[j] = sm[j] * (sg[j] + sq2[j] - (float)l) + sm[j] * (ds + 2.f * a[j] * dq);
    }
    sq[target] = (float)d_target;
  }
  // through the ELU: d a / d s = 1 for s > 0, a + elu otherwise
  for (int64_t j = 0; j < cols; ++j) {
    const float da_ds = (elu > 0 && row[j] <= 0) ? a[j] + elu : 1.f;
    row[j] = sq[j] * da_ds * scale;
  }
  return loss;
}

struct Net {
  bool separate = false, one_hot = false;
  int n_layers = 0, d = 0, total_h = 0, in0 = 0, item_emb = 0, item_bias = 0;
  int64_t n_items = 0;
  int64_t dense_size = 0;  // floats of the flat dense gradient: per layer [w_ih (unless one-hot), w_hh, b_ih, b_hh]
  std::vector<Param> p;
};

// The parameter list (layout at the top of this file) as pointers and layer shapes.
Net parse_net(const std::vector<paddle::Tensor>& params, int embedding, std::vector<Layer>& layers) {
  Net net;
  net.separate = embedding == kSeparate;
  net.one_hot = embedding == kOneHot;
  const int first = net.separate ? 1 : 0;
  net.n_layers = (int)(params.size() - 2 - first) / 4;
  PD_CHECK(net.n_layers >= 1 && (int)params.size() == first + 4 * net.n_layers + 2, "unexpected parameter list");
  net.item_emb = first + 4 * net.n_layers;
  net.item_bias = net.item_emb + 1;
  net.n_items = params[net.item_emb].shape()[0];
  net.d = (int)params[net.item_emb].shape()[1];
  net.p.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    net.p[i].value = mut(params[i]);
    net.p[i].size = params[i].numel();
  }
  layers.resize(net.n_layers);
  for (int l = 0; l < net.n_layers; ++l) {
    Layer& L = layers[l];
    L.w_ih = first + 4 * l;
    L.w_hh = L.w_ih + 1;
    L.b_ih = L.w_ih + 2;
    L.b_hh = L.w_ih + 3;
    L.in = (int)params[L.w_ih].shape()[0];
    L.h = (int)params[L.w_hh].shape()[0];
    net.total_h += L.h;
    const int64_t h3 = 3 * L.h;
    L.g_w_ih = -1;
    if (!net.one_hot || l > 0) {
      L.g_w_ih = net.dense_size;
      net.dense_size += L.in * h3;
    }
    L.g_w_hh = net.dense_size;
    net.dense_size += L.h * h3;
    L.g_b_ih = net.dense_size;
    net.dense_size += h3;
    L.g_b_hh = net.dense_size;
    net.dense_size += h3;
  }
  net.in0 = net.one_hot ? 0 : layers[0].in;
  return net;
}

// One GRU layer, in pieces over L's buffers (sized for the mini-batch by L.resize): h_in, gi, gh,
// r, z, c, out, kept for the backward pass. L.x: [n, in] input rows, or null for the one-hot
// first layer whose input gates are rows of w_ih picked by x_ids.

// gi rows [r0, r1) = b_ih + x w_ih (the input gates)
void layer_input_gates(Layer& L, const std::vector<Param>& p, int64_t r0, int64_t r1, const int64_t* x_ids) {
  const int h3 = 3 * L.h;
  const int m = (int)(r1 - r0);
  if (m <= 0) return;
  const float* b_ih = p[L.b_ih].value;
  if (L.x == nullptr) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* w = p[L.w_ih].value + x_ids[i] * h3;
      for (int k = 0; k < h3; ++k) L.gi[i * h3 + k] = w[k] + b_ih[k];
    }
    return;
  }
  float* gi_rows = &L.gi[r0 * h3];
  for (int i = 0; i < m; ++i) std::memcpy(gi_rows + (int64_t)i * h3, b_ih, sizeof(float) * h3);
  gemm(false, false, m, h3, L.in, L.x + r0 * L.in, L.in, p[L.w_ih].value, h3, gi_rows, h3, 1.f);
}

// gh rows [r0, r1) = b_hh + h_in w_hh (the hidden gates)
void layer_hidden_gates(Layer& L, const std::vector<Param>& p, int64_t r0, int64_t r1) {
  const int h = L.h, h3 = 3 * h;
  const int m = (int)(r1 - r0);
  if (m <= 0) return;
  float* gh_rows = &L.gh[r0 * h3];
  for (int i = 0; i < m; ++i) std::memcpy(gh_rows + (int64_t)i * h3, p[L.b_hh].value, sizeof(float) * h3);
  gemm(false, false, m, h3, h, &L.h_in[r0 * h], h, p[L.w_hh].value, h3, gh_rows, h3, 1.f);
}

// rows [r0, r1) of r, z = sigmoid(.), c = tanh(.) (MKL's vector functions) and out (no dropout)
void layer_cell(Layer& L, int64_t r0, int64_t r1) {
  const int h = L.h, h3 = 3 * h;
  if (r1 <= r0) return;
  const int64_t e0 = r0 * h, e1 = r1 * h;
  for (int64_t i = r0; i < r1; ++i) {
    const float* gi = &L.gi[i * h3];
    const float* gh = &L.gh[i * h3];
    float* r = &L.r[i * h];
    float* z = &L.z[i * h];
    for (int k = 0; k < h; ++k) {
      r[k] = -(gi[k] + gh[k]);
      z[k] = -(gi[h + k] + gh[h + k]);
    }
  }
  vsExp((int)(e1 - e0), &L.r[e0], &L.r[e0]);
  vsExp((int)(e1 - e0), &L.z[e0], &L.z[e0]);
  for (int64_t e = e0; e < e1; ++e) {
    L.r[e] = 1.f / (1.f + L.r[e]);
    L.z[e] = 1.f / (1.f + L.z[e]);
  }
  for (int64_t i = r0; i < r1; ++i) {
    const float* gi = &L.gi[i * h3];
    const float* gh = &L.gh[i * h3];
    const float* r = &L.r[i * h];
    float* c = &L.c[i * h];
    for (int k = 0; k < h; ++k) c[k] = gi[2 * h + k] + r[k] * gh[2 * h + k];
  }
  vsTanh((int)(e1 - e0), &L.c[e0], &L.c[e0]);
  for (int64_t e = e0; e < e1; ++e) L.out[e] = L.c[e] + L.z[e] * (L.h_in[e] - L.c[e]);
}

// Rows [r0, r1) of one GRU layer (no dropout); h_all: [n, total_h] carried states, this layer's
// slice at column h_off.
void layer_forward(Layer& L, const std::vector<Param>& p, int64_t r0, int64_t r1, const float* h_all, int total_h,
                   int h_off, const int64_t* x_ids) {
  for (int64_t i = r0; i < r1; ++i)
    std::memcpy(&L.h_in[i * L.h], &h_all[i * total_h + h_off], sizeof(float) * L.h);
  layer_input_gates(L, p, r0, r1, x_ids);
  layer_hidden_gates(L, p, r0, r1);
  layer_cell(L, r0, r1);
}

struct Scratch {
  std::vector<float> prev_hidden, next_hidden, h_all, x0, mask0, out_rows, out_bias, scores, shift, d_x, d_x_tiles,
      d_out_rows, d_bias, dense_grad;
  std::vector<int64_t> cols;
  std::vector<float> weights;  // copies per output column (negatives drawn more than once)
  std::vector<double> row_loss;
  std::vector<int32_t> sample_count;  // item -> times drawn among this step's negatives (0 between steps)
  std::vector<uint64_t> sample_seen;  // bit per item: drawn this step (0 between steps)
  // the next step's distinct negatives and their weights, merged ahead (count -1: not yet)
  std::vector<int64_t> next_neg_items;
  std::vector<float> next_neg_weights;
  int64_t next_neg_count = -1;
  std::vector<std::vector<float>> member_tmp;  // per thread: loss-row scratch, then a gradient row
  std::vector<UpdateTask> tasks, dense_tasks;
  SparseRows item_emb, item_bias, input_emb;
};

struct Settings {
  int embedding, loss_kind, optimizer, batch_size;
  float dropout_embed, dropout_hidden, logq, sample_alpha, bpreg, elu, lr, momentum;
  int64_t seed;
};

// One training step's arithmetic, in phases that each spread over the threads:
//   gradients(): forward (row tiles, and per layer one task per weight matrix), scores (column
//   tiles), loss (rows), backward through the scores (column tiles), backward through the GRU
//   layers (row tiles, then one task per weight matrix), then the gradients: the dense ones in
//   sc.dense_grad, the item-indexed ones as merged rows in sc's SparseRows;
//   update(): Adagrad/SGD (+ momentum) on the dense chunks and the touched rows (all threads).
// The two halves are also separate operators, so distributed training can combine the
// gradients of several workers in between.
struct Trainer {
  Net& net;
  std::vector<Layer>& layers;
  Scratch& sc;
  const Settings& st;
  const int members;
  const float* log_sup;  // [n_items] log of each item's sampling support (logQ)
  Update upd;

  Trainer(Net& net_, std::vector<Layer>& layers_, Scratch& sc_, const Settings& st_, int members_, int capacity,
          const float* log_sup_)
      : net(net_), layers(layers_), sc(sc_), st(st_), members(members_), log_sup(log_sup_),
        upd{st_.optimizer, st_.lr, st_.momentum} {
    const int64_t n_items = net.n_items;
    if ((int64_t)sc.sample_count.size() != n_items) {
      sc.sample_count.assign(n_items, 0);
      sc.sample_seen.assign((n_items + 63) / 64, 0);
    }
    sc.item_emb.begin(n_items, net.d);
    sc.item_bias.begin(n_items, 1);
    if (net.separate) sc.input_emb.begin(n_items, net.in0);
    if (net.one_hot) sc.input_emb.begin(n_items, 3 * layers[0].h);
    sc.member_tmp.resize(capacity);
    sc.dense_grad.resize(net.dense_size);
    sc.next_neg_count = -1;  // nothing merged ahead from an earlier call
  }

  std::vector<SparseRows*> sparse_tables() {
    std::vector<SparseRows*> tables = {&sc.item_emb, &sc.item_bias};
    if (net.separate || net.one_hot) tables.push_back(&sc.input_emb);
    return tables;
  }
  const Param& sparse_param(const SparseRows* table) const {
    if (table == &sc.item_emb) return net.p[net.item_emb];
    if (table == &sc.item_bias) return net.p[net.item_bias];
    return net.p[net.separate ? 0 : layers[0].w_ih];
  }

  // A negative drawn k times is one column of weight k: identical columns have identical scores
  // and gradients, so this is the same arithmetic with fewer products (popular items repeat
  // often: ~1,330 distinct among 2,048 draws on the 100k RSC15 split). The negatives' columns go
  // in item order: then the threads' shares of column tiles and of the update's row blocks cover
  // about the same item ranges, and an item's rows tend to stay in the cache of the thread that
  // gathers, differentiates and updates them. Writes the distinct items of samples[0, n_sample)
  // and their counts; returns how many.
  int64_t merge_negatives(const int64_t* samples, int64_t n_sample, int64_t* items, float* counts) {
    for (int64_t q = 0; q < n_sample; ++q) {
      const int64_t item = samples[q];
      if (sc.sample_count[item]++ == 0) sc.sample_seen[item >> 6] |= (uint64_t)1 << (item & 63);
    }
    int64_t u = 0;
    for (size_t w = 0; w < sc.sample_seen.size(); ++w) {
      for (uint64_t bits = sc.sample_seen[w]; bits; bits &= bits - 1) {
        const int64_t item = (int64_t)(w << 6) + __builtin_ctzll(bits);
        items[u] = item;
        counts[u++] = (float)sc.sample_count[item];
        sc.sample_count[item] = 0;
      }
      sc.sample_seen[w] = 0;
    }
    return u;
  }

  // The step's rows: inputs x_ids, targets t_ids, carry c_ids ([n] each; carry: row of the
  // previous step, -1: a new session); row_samples: its n_sample shared negatives, next_samples
  // the next step's (or null: merged then, during this step's backward, where a thread has
  // time to spare). prev: the previous step's [prev_rows, total_h] states; writes
  // sc.next_hidden. Returns the summed row loss; when it is not finite nothing else is computed.
  double gradients(int n, const int64_t* x_ids, const int64_t* t_ids, const int64_t* c_ids,
                   const int64_t* row_samples, const int64_t* next_samples, int64_t n_sample, const float* prev,
                   int64_t prev_rows, uint64_t step_key) {
    std::vector<Param>& p = net.p;
    const int d = net.d, total_h = net.total_h, in0 = net.in0, n_layers = net.n_layers;
    const int64_t n_items = net.n_items;
    const bool full = st.loss_kind == kFullSoftmax;

    // output columns: the mini-batch's targets, then the shared negatives (or every item)
    int64_t cols = full ? n_items : n + n_sample;
    sc.cols.resize(cols);
    const float* weights = nullptr;
    const bool with_negatives = !full && n_sample > 0;
    if (full) {
      for (int64_t j = 0; j < cols; ++j) sc.cols[j] = j;
    } else {
      std::memcpy(sc.cols.data(), t_ids, sizeof(int64_t) * n);
    }
    if (with_negatives) {
      sc.weights.assign(cols, 1.f);
      weights = sc.weights.data();
    }
    // the negatives: merged during the last step, or here as one task beside the forward's row
    // tiles (nothing before the scores needs them)
    bool merge_here = false;
    if (with_negatives && sc.next_neg_count >= 0) {
      std::memcpy(&sc.cols[n], sc.next_neg_items.data(), sizeof(int64_t) * sc.next_neg_count);
      std::memcpy(&sc.weights[n], sc.next_neg_weights.data(), sizeof(float) * sc.next_neg_count);
      cols = n + sc.next_neg_count;
    } else {
      merge_here = with_negatives;
    }
    sc.next_neg_count = -1;
    const int64_t row_tiles = (n + kRowTile - 1) / kRowTile;

    // carried hidden state [n, total_h]
    sc.h_all.assign((int64_t)n * total_h, 0.f);
    for (int i = 0; i < n; ++i) {
      const int64_t c = c_ids[i];
      PD_CHECK(c < prev_rows, "carry row ", c, " is beyond the previous step's ", prev_rows, " rows");
      if (c >= 0) std::memcpy(&sc.h_all[(int64_t)i * total_h], prev + c * total_h, sizeof(float) * total_h);
    }

    // ---- forward: the rows' inputs and carried states (row tiles); then per layer its input gates
    // and its hidden gates (two tasks, each a product with one weight matrix over every row), then
    // the cell (row tiles). One thread multiplies by w_ih and another by w_hh: each reads the
    // matrix it updated in the last step's update (the dense chunks of w_ih come first in the
    // update's task list, so its first share), which stays in its cache, instead of every thread
    // fetching every weight the other threads have just written. ----
    if (!net.one_hot) sc.x0.resize((int64_t)n * in0);
    if (!net.one_hot && st.dropout_embed > 0) sc.mask0.resize((int64_t)n * in0);
    for (int l = 0; l < n_layers; ++l) {
      Layer& L = layers[l];
      L.resize(n, true);
      L.x = l > 0 ? layers[l - 1].out.data() : (net.one_hot ? nullptr : sc.x0.data());
      const float p_drop = (net.one_hot && l == 0) ? st.dropout_embed : st.dropout_hidden;
      if (p_drop > 0)
        L.mask.resize((int64_t)n * L.h);
      else
        L.mask.clear();
    }
    sc.next_hidden.resize((int64_t)n * total_h);
    parallel_for(members, row_tiles + (merge_here ? 1 : 0), [&](int64_t t, int) {
      if (t == row_tiles) {  // the last task
        cols = n + merge_negatives(row_samples, n_sample, &sc.cols[n], &sc.weights[n]);
        return;
      }
      const int64_t r0 = t * kRowTile, r1 = std::min<int64_t>(n, r0 + kRowTile);
      int h_off = 0;
      for (Layer& L : layers) {
        for (int64_t i = r0; i < r1; ++i)
          std::memcpy(&L.h_in[i * L.h], &sc.h_all[i * total_h + h_off], sizeof(float) * L.h);
        h_off += L.h;
      }
      if (!net.one_hot) {
        const float* table = p[net.separate ? 0 : net.item_emb].value;
        for (int64_t i = r0; i < r1; ++i)
          std::memcpy(&sc.x0[i * in0], table + x_ids[i] * in0, sizeof(float) * in0);
        if (st.dropout_embed > 0) dropout_rows(sc.x0.data(), sc.mask0.data(), in0, r0, r1, st.dropout_embed, step_key, 0);
      }
    });
    for (int l = 0, h_off = 0; l < n_layers; h_off += layers[l].h, ++l) {
      Layer& L = layers[l];
      parallel_for(members, 2, [&](int64_t t, int) {
        if (t == 0)
          layer_input_gates(L, p, 0, n, x_ids);
        else
          layer_hidden_gates(L, p, 0, n);
      });
      const float p_drop = (net.one_hot && l == 0) ? st.dropout_embed : st.dropout_hidden;
      parallel_for(members, row_tiles, [&](int64_t t, int) {
        const int64_t r0 = t * kRowTile, r1 = std::min<int64_t>(n, r0 + kRowTile);
        layer_cell(L, r0, r1);
        if (!L.mask.empty()) dropout_rows(L.out.data(), L.mask.data(), L.h, r0, r1, p_drop, step_key, 1 + l);
        // the dropped-out output is also the state the next step continues from
        for (int64_t i = r0; i < r1; ++i)
          std::memcpy(&sc.next_hidden[i * total_h + h_off], &L.out[i * L.h], sizeof(float) * L.h);
      });
    }
    const float* x = layers[n_layers - 1].out.data();  // [n, d]
    sc.cols.resize(cols);
    sc.weights.resize(weights ? cols : 0);
    const int64_t n_tiles = (cols + kColTile - 1) / kColTile;

    // ---- scores [n, cols] = x @ out_rows^T, per column tile (the bias is added with the loss) ----
    sc.out_rows.resize(cols * d);
    sc.out_bias.resize(cols);
    sc.scores.resize((int64_t)n * cols);
    {
      const float* emb = p[net.item_emb].value;
      const float* bias = p[net.item_bias].value;
      const int64_t* col_items = sc.cols.data();
      float* out_rows = sc.out_rows.data();
      float* out_bias = sc.out_bias.data();
      float* scores = sc.scores.data();
      parallel_for(members, n_tiles, [&](int64_t t, int) {
        const int64_t j0 = t * kColTile, j1 = std::min(cols, j0 + kColTile);
        // the rows are scattered over the item matrix: ask for the next ones while copying
        for (int64_t j = j0; j < std::min(j1, j0 + 4); ++j) prefetch_row(emb + col_items[j] * d, d);
        for (int64_t j = j0; j < j1; ++j) {
          if (j + 4 < j1) prefetch_row(emb + col_items[j + 4] * d, d);
          std::memcpy(out_rows + j * d, emb + col_items[j] * d, sizeof(float) * d);
          out_bias[j] = bias[col_items[j]];
        }
        gemm(false, true, n, (int)(j1 - j0), d, x, d, out_rows + j0 * d, d, scores + j0, (int)cols);
      });
    }

    // ---- loss and d(loss)/d(scores) * scale, in place, per row ----
    // per column: the item bias, less logq * log(sampling weight) for cross-entropy with logQ
    sc.shift.assign(sc.out_bias.begin(), sc.out_bias.end());
    if (st.loss_kind == kCrossEntropy && st.logq > 0)
      for (int64_t j = 0; j < cols; ++j)
        sc.shift[j] -= st.logq * (j < n ? 1.f : st.sample_alpha) * log_sup[sc.cols[j]];
    const float* offset = sc.shift.data();
    for (auto& tmp : sc.member_tmp) tmp.resize(std::max<int64_t>(5 * cols, 3 * total_h + in0 + d));
    sc.row_loss.resize(n);
    const float scale = 1.f / (float)st.batch_size;
    parallel_for(members, n, [&](int64_t i, int m) {
      float* tmp = sc.member_tmp[m].data();
      float* row = &sc.scores[i * cols];
      const int64_t target = full ? t_ids[i] : i;
      sc.row_loss[i] = (st.loss_kind == kCrossEntropy || full)
                           ? cross_entropy_row(row, cols, target, offset, weights, tmp, scale)
                           : ranking_row(st.loss_kind, row, cols, target, offset, st.elu, st.bpreg, weights, tmp,
                                         scale);
    });
    double loss = 0;
    for (int i = 0; i < n; ++i) loss += sc.row_loss[i];
    if (!std::isfinite(loss)) return loss;

    // ---- backward through the scores, per column tile ----
    // d_out_rows[tile] = ds[:, tile]^T x, d_bias[tile] = column sums of ds, and this tile's part
    // of d_x = ds[:, tile] out_rows[tile]; the parts are summed in tile order below.
    const int64_t nd = (int64_t)n * d;
    sc.d_out_rows.resize(cols * d);
    sc.d_bias.resize(cols);
    sc.d_x_tiles.resize(n_tiles * nd);
    sc.d_x.resize(nd);
    {
      const float* ds = sc.scores.data();
      parallel_for(members, n_tiles, [&](int64_t t, int) {
        const int64_t j0 = t * kColTile, j1 = std::min(cols, j0 + kColTile);
        const int w = (int)(j1 - j0);
        gemm(true, false, w, d, n, ds + j0, (int)cols, x, d, &sc.d_out_rows[j0 * d], d);
        float* db = &sc.d_bias[j0];
        std::memcpy(db, ds + j0, sizeof(float) * w);
        for (int i = 1; i < n; ++i) {
          const float* row = ds + (int64_t)i * cols + j0;
          for (int j = 0; j < w; ++j) db[j] += row[j];
        }
        gemm(false, false, n, d, w, ds + j0, (int)cols, &sc.out_rows[j0 * d], d, &sc.d_x_tiles[t * nd], d);
      });
    }

    // ---- backward through the GRU layers, top down: the gates' gradients (row tiles), then the
    // weight gradients and the gradient w.r.t. the layer's input (two tasks over every row: the
    // one with w_ih, the one with w_hh, as in the forward), straight into sc.dense_grad ----
    // No backpropagation through time: the carried state is a constant, but W_hh still learns.
    float* grad = sc.dense_grad.data();
    for (int l = n_layers - 1; l >= 0; --l) {
      Layer& L = layers[l];
      const int h = L.h, h3 = 3 * h;
      // gradient w.r.t. this layer's (dropped-out) output [n, h]: from the scores (the column
      // tiles' parts of d_x, added in tile order) or the layer above's input gradient
      float* d_out = l + 1 < n_layers ? layers[l + 1].d_in.data() : sc.d_x.data();
      parallel_for(members, row_tiles, [&](int64_t t, int) {
        const int64_t r0 = t * kRowTile, r1 = std::min<int64_t>(n, r0 + kRowTile);
        if (l + 1 == n_layers)
          for (int64_t e = r0 * d; e < r1 * d; ++e) {
            float sum = sc.d_x_tiles[e];
            for (int64_t c = 1; c < n_tiles; ++c) sum += sc.d_x_tiles[c * nd + e];
            d_out[e] = sum;
          }
        if (!L.mask.empty())
          for (int64_t e = r0 * h; e < r1 * h; ++e) d_out[e] *= L.mask[e];
        for (int64_t i = r0; i < r1; ++i) {
          const float* gh = &L.gh[i * h3];
          float* dgi = &L.dgi[i * h3];
          float* dgh = &L.dgh[i * h3];
          for (int k = 0; k < h; ++k) {
            const int64_t e = i * h + k;
            const float r = L.r[e], z = L.z[e], c = L.c[e], dh = d_out[e];
            const float dc = dh * (1.f - z);
            const float dz = dh * (L.h_in[e] - c);
            const float dac = dc * (1.f - c * c);
            const float dr = dac * gh[2 * h + k];
            const float daz = dz * z * (1.f - z);
            const float dar = dr * r * (1.f - r);
            dgi[k] = dar;
            dgi[h + k] = daz;
            dgi[2 * h + k] = dac;
            dgh[k] = dar;
            dgh[h + k] = daz;
            dgh[2 * h + k] = dac * r;
          }
        }
      });
      // with the lowest layer, the next step's negatives: the task with w_hh is the shorter one
      const bool merge_next = l == 0 && with_negatives && next_samples != nullptr;
      if (merge_next) {
        sc.next_neg_items.resize(n_sample);
        sc.next_neg_weights.resize(n_sample);
      }
      parallel_for(members, merge_next ? 3 : 2, [&](int64_t t, int) {
        if (t == 2) {
          sc.next_neg_count = merge_negatives(next_samples, n_sample, sc.next_neg_items.data(),
                                              sc.next_neg_weights.data());
          return;
        }
        const std::vector<float>& dg = t == 0 ? L.dgi : L.dgh;
        float* db = grad + (t == 0 ? L.g_b_ih : L.g_b_hh);
        std::memcpy(db, dg.data(), sizeof(float) * h3);
        for (int64_t i = 1; i < n; ++i)
          for (int k = 0; k < h3; ++k) db[k] += dg[i * h3 + k];
        if (t == 1) {
          gemm(true, false, h, h3, n, L.h_in.data(), h, L.dgh.data(), h3, grad + L.g_w_hh, h3);
          return;
        }
        if (L.x == nullptr) return;  // the one-hot input: its rows of w_ih are sparse gradients (dgi rows)
        gemm(true, false, L.in, h3, n, L.x, L.in, L.dgi.data(), h3, grad + L.g_w_ih, h3);
        // gradient w.r.t. this layer's input (the previous layer's output, or the embedding)
        gemm(false, true, n, L.in, h3, L.dgi.data(), h3, p[L.w_ih].value, h3, L.d_in.data(), L.in);
        if (l == 0 && st.dropout_embed > 0)
          for (int64_t e = 0; e < (int64_t)n * in0; ++e) L.d_in[e] *= sc.mask0[e];
      });
    }

    // ---- the item-indexed gradients: sources in a fixed order (columns, then inputs), one
    // table per task ----
    std::vector<SparseRows*> tables = sparse_tables();
    parallel_for(members, (int64_t)tables.size(), [&](int64_t k, int) {
      SparseRows& table = *tables[k];
      table.clear();  // last step's rows, cleared by the thread that fills the table (its cache lines)
      if (&table == &sc.item_emb)
        for (int64_t j = 0; j < cols; ++j) table.add(sc.cols[j], &sc.d_out_rows[j * d]);
      if (&table == &sc.item_bias)
        for (int64_t j = 0; j < cols; ++j) table.add(sc.cols[j], &sc.d_bias[j]);
      const bool inputs_here = net.one_hot || net.separate ? &table == &sc.input_emb : &table == &sc.item_emb;
      if (inputs_here && net.one_hot) {
        const int h3 = 3 * layers[0].h;
        for (int i = 0; i < n; ++i) table.add(x_ids[i], &layers[0].dgi[(int64_t)i * h3]);
      } else if (inputs_here) {
        for (int i = 0; i < n; ++i) table.add(x_ids[i], &layers[0].d_in[(int64_t)i * in0]);
      }
      table.finish();
    });
    return loss;
  }


  // the update from sc.dense_grad and the finished SparseRows: dense chunks and blocks of
  // touched rows, all threads at once
  void update() {
    std::vector<Param>& p = net.p;
    std::vector<UpdateTask>& tasks = sc.tasks;
    std::vector<UpdateTask>& dense_tasks = sc.dense_tasks;
    tasks.clear();
    dense_tasks.clear();
    auto add_dense = [&](int index, int64_t offset) {
      for (int64_t lo = 0; lo < p[index].size; lo += kChunk)
        dense_tasks.push_back({&p[index], sc.dense_grad.data() + offset, nullptr, lo, std::min(p[index].size, lo + kChunk)});
    };
    for (const Layer& L : layers) {
      if (L.g_w_ih >= 0) add_dense(L.w_ih, L.g_w_ih);
      add_dense(L.w_hh, L.g_w_hh);
      add_dense(L.b_ih, L.g_b_ih);
      add_dense(L.b_hh, L.g_b_hh);
    }
    for (SparseRows* table : sparse_tables()) {
      const int64_t block = std::max<int64_t>(1, kChunk / table->width);
      for (int64_t lo = 0; lo < (int64_t)table->items.size(); lo += block)
        tasks.push_back({&sparse_param(table), nullptr, table, lo, std::min<int64_t>(table->items.size(), lo + block)});
    }
    // The dense chunks spread evenly among the row blocks: a thread's contiguous share of the
    // tasks then holds about its share of the item rows, in the order of the column tiles it had.
    const size_t n_rows = tasks.size(), n_dense = dense_tasks.size(), total = n_rows + n_dense;
    tasks.resize(total);
    for (size_t k = total, r = n_rows, q = n_dense; k-- > 0;) {
      // dense chunk q - 1 goes where its share of the positions says (place from the end, in place)
      if (q > 0 && (r == 0 || (2 * (q - 1) + 1) * total >= 2 * k * n_dense))
        tasks[k] = dense_tasks[--q];
      else
        tasks[k] = tasks[--r];
    }
    parallel_for(members, (int64_t)tasks.size(), [&](int64_t k, int m) {
      const UpdateTask& task = tasks[k];
      const Param& q = *task.param;
      if (task.rows == nullptr) {
        const int64_t o = task.lo, len = task.hi - task.lo;
        upd.apply(q.value + o, task.grad + o, q.acc ? q.acc + o : nullptr, q.mom ? q.mom + o : nullptr, len);
        return;
      }
      const SparseRows& g = *task.rows;
      const int w = g.width;
      float* sum = sc.member_tmp[m].data();
      for (int64_t r = task.lo; r < task.hi; ++r) {
        if (r + 2 < task.hi) {
          const int64_t ahead = g.items[r + 2] * w;
          prefetch_row(q.value + ahead, w);
          if (q.acc) prefetch_row(q.acc + ahead, w);
          if (q.mom) prefetch_row(q.mom + ahead, w);
        }
        const int64_t o = g.items[r] * w;
        upd.apply(q.value + o, g.gradient(r, sum), q.acc ? q.acc + o : nullptr, q.mom ? q.mom + o : nullptr, w);
      }
    });
  }
};

// Parameters, their optimizer slots (Adagrad accumulators, then momentum buffers) as pointers.
void attach_slots(Net& net, const std::vector<paddle::Tensor>& slots, int optimizer, float momentum) {
  const int n_params = (int)net.p.size();
  const bool with_acc = optimizer == kAdagrad;
  const bool with_mom = momentum > 0.f;
  PD_CHECK((int)slots.size() == n_params * ((with_acc ? 1 : 0) + (with_mom ? 1 : 0)), "unexpected optimizer slots");
  for (int i = 0; i < n_params; ++i) {
    int s = 0;
    if (with_acc) net.p[i].acc = mut(slots[s++ * n_params + i]);
    if (with_mom) net.p[i].mom = mut(slots[s * n_params + i]);
  }
}

uint64_t step_key(int64_t seed, int64_t step) { return mix64(mix64((uint64_t)seed) ^ mix64((uint64_t)step + 1)); }

// What every training operator sets up: the threads, single-threaded MKL for this call, the
// calling thread's buffers (they live across calls: fresh pages cost a page-clear each time) and
// the parameter list.
std::vector<Layer>& thread_layers() {
  static thread_local std::vector<Layer> layers;
  return layers;
}
Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}
struct OpSetup {
  const int members = team_size();
  MklThreads one_thread{1};
  std::vector<Layer>& layers;
  Scratch& sc;
  Net net;
  OpSetup(const std::vector<paddle::Tensor>& params, int embedding)
      : layers(thread_layers()), sc(thread_scratch()), net(parse_net(params, embedding, layers)) {
    Team::get().ensure(members);
  }
};

}  // namespace

std::vector<paddle::Tensor> Gru4recTrainSteps(const std::vector<paddle::Tensor>& params,
                                              const std::vector<paddle::Tensor>& slots, const paddle::Tensor& hidden,
                                              const paddle::Tensor& step_offsets, const paddle::Tensor& inputs,
                                              const paddle::Tensor& targets, const paddle::Tensor& carry,
                                              const paddle::Tensor& samples, const paddle::Tensor& log_support,
                                              int embedding, int loss_kind, int optimizer, int batch_size,
                                              float dropout_embed, float dropout_hidden, float logq, float sample_alpha,
                                              float bpreg, float elu, float lr, float momentum, int64_t seed) {
  // Every thread runs single-threaded MKL on its own tiles (see Team): the results are the same
  // for any thread count.
  OpSetup op(params, embedding);
  Net& net = op.net;
  Scratch& sc = op.sc;  // a lambda naming a thread_local would see the helper thread's own copy
  attach_slots(net, slots, optimizer, momentum);
  const Settings st{embedding, loss_kind, optimizer, batch_size, dropout_embed, dropout_hidden, logq,
                    sample_alpha, bpreg, elu, lr, momentum, seed};
  Trainer trainer(net, op.layers, sc, st, op.members, Team::get().capacity(), log_support.data<float>());

  const int64_t n_steps = step_offsets.numel() - 1;
  const int64_t* offs = step_offsets.data<int64_t>();
  const int64_t* in_ids = inputs.data<int64_t>();
  const int64_t* tg_ids = targets.data<int64_t>();
  const int64_t* car = carry.data<int64_t>();
  const int64_t n_sample = samples.numel() ? samples.shape()[1] : 0;
  const int64_t* smp = samples.numel() ? samples.data<int64_t>() : nullptr;
  check_ids(in_ids, inputs.numel(), net.n_items, "inputs");
  check_ids(tg_ids, targets.numel(), net.n_items, "targets");
  if (smp) check_ids(smp, samples.numel(), net.n_items, "samples");

  const int total_h = net.total_h;
  int64_t prev_rows = hidden.numel() ? hidden.shape()[0] : 0;
  PD_CHECK(prev_rows == 0 || hidden.shape()[1] == total_h, "hidden state width mismatch");
  sc.prev_hidden.assign(hidden.data<float>(), hidden.data<float>() + prev_rows * total_h);

  auto losses = paddle::empty({n_steps}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  float* loss_out = losses.data<float>();
  int64_t rows = 0;
  for (int64_t s = 0; s < n_steps; ++s) {
    const int64_t lo = offs[s];
    rows = offs[s + 1] - lo;
    const int n = (int)rows;
    if (loss_kind != kFullSoftmax && n_sample == 0 && n < 2) {
      // a lone row has no negative without shared samples: the official code ends the epoch here
      loss_out[s] = 0.f;
      continue;
    }
    const int64_t* next_smp = smp && s + 1 < n_steps ? smp + (s + 1) * n_sample : nullptr;
    const double loss = trainer.gradients(n, in_ids + lo, tg_ids + lo, car + lo, smp ? smp + s * n_sample : nullptr,
                                          next_smp, n_sample, sc.prev_hidden.data(), prev_rows, step_key(seed, s));
    loss_out[s] = (float)loss;  // the sum over rows; the gradients are those of loss / batch_size
    if (!std::isfinite(loss)) {
      // stop before the update: the caller reports this step and keeps the last good checkpoint
      for (int64_t r = s + 1; r < n_steps; ++r) loss_out[r] = 0.f;
      break;
    }
    trainer.update();
    sc.prev_hidden.swap(sc.next_hidden);
    prev_rows = n;
  }
  auto hidden_out = paddle::empty({rows, (int64_t)total_h}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  std::memcpy(hidden_out.data<float>(), sc.prev_hidden.data(), sizeof(float) * rows * total_h);
  return {losses, hidden_out};
}

namespace {

// A SparseRows table as (item ids int64 [m], summed gradient rows float [m, width]).
std::vector<paddle::Tensor> table_tensors(const SparseRows& table, float* scratch) {
  const int64_t m = (int64_t)table.items.size();
  auto ids = paddle::empty({m}, paddle::DataType::INT64, paddle::CPUPlace());
  auto grads = paddle::empty({m, (int64_t)table.width}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  if (m) std::memcpy(ids.data<int64_t>(), table.items.data(), sizeof(int64_t) * m);
  float* out = grads.data<float>();
  for (int64_t s = 0; s < m; ++s)
    std::memcpy(out + s * table.width, table.gradient(s, scratch), sizeof(float) * table.width);
  return {ids, grads};
}

}  // namespace

// One training step's gradients without the update (distributed training combines them with
// the other workers' before gru4rec_update_step): the loss (summed over rows), the next
// hidden state, the flat dense gradient (per layer: w_ih unless the input is one-hot, w_hh, b_ih,
// b_hh) and, per item-indexed parameter (item_emb, item_bias, then input_emb or gru0_w_ih when
// the embedding is separate or none), its touched rows and their summed gradients.
std::vector<paddle::Tensor> Gru4recBackwardStep(const std::vector<paddle::Tensor>& params,
                                                 const paddle::Tensor& hidden, const paddle::Tensor& inputs,
                                                 const paddle::Tensor& targets, const paddle::Tensor& carry,
                                                 const paddle::Tensor& samples, const paddle::Tensor& log_support,
                                                 int embedding, int loss_kind, int optimizer, int batch_size,
                                                 float dropout_embed, float dropout_hidden, float logq,
                                                 float sample_alpha, float bpreg, float elu, float lr, float momentum,
                                                 int64_t seed) {
  OpSetup op(params, embedding);
  Net& net = op.net;
  Scratch& sc = op.sc;
  const Settings st{embedding, loss_kind, optimizer, batch_size, dropout_embed, dropout_hidden, logq,
                    sample_alpha, bpreg, elu, lr, momentum, seed};
  Trainer trainer(net, op.layers, sc, st, op.members, Team::get().capacity(), log_support.data<float>());
  const int n = (int)inputs.numel();
  const int64_t n_sample = samples.numel() ? samples.shape()[1] : 0;
  const int64_t* smp = samples.numel() ? samples.data<int64_t>() : nullptr;
  check_ids(inputs.data<int64_t>(), n, net.n_items, "inputs");
  check_ids(targets.data<int64_t>(), n, net.n_items, "targets");
  if (smp) check_ids(smp, samples.numel(), net.n_items, "samples");
  PD_CHECK(loss_kind == kFullSoftmax || n_sample > 0 || n >= 2, "a lone row without shared negatives has no loss");
  const int64_t prev_rows = hidden.numel() ? hidden.shape()[0] : 0;
  const double loss = trainer.gradients(n, inputs.data<int64_t>(), targets.data<int64_t>(), carry.data<int64_t>(),
                                        smp, nullptr, n_sample, hidden.data<float>(), prev_rows, step_key(seed, 0));
  auto loss_t = paddle::empty({1}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  loss_t.data<float>()[0] = (float)loss;
  auto hidden_out = paddle::empty({(int64_t)n, (int64_t)net.total_h}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  std::memcpy(hidden_out.data<float>(), sc.next_hidden.data(), sizeof(float) * n * net.total_h);
  auto dense = paddle::empty({net.dense_size}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  std::vector<paddle::Tensor> out = {loss_t, hidden_out, dense};
  if (!std::isfinite(loss)) {  // no gradients: the caller stops
    std::memset(dense.data<float>(), 0, sizeof(float) * net.dense_size);
    for (SparseRows* table : trainer.sparse_tables()) table->clear();
    for (SparseRows* table : trainer.sparse_tables()) table->finish();
  } else {
    std::memcpy(dense.data<float>(), sc.dense_grad.data(), sizeof(float) * net.dense_size);
  }
  float* row_scratch = sc.member_tmp[0].data();
  std::vector<SparseRows*> tables = trainer.sparse_tables();
  for (int k = 0; k < 3; ++k) {
    if (k < (int)tables.size()) {
      for (const paddle::Tensor& t : table_tensors(*tables[k], row_scratch)) out.push_back(t);
    } else {  // no third table (shared embedding)
      out.push_back(paddle::empty({0}, paddle::DataType::INT64, paddle::CPUPlace()));
      out.push_back(paddle::empty({0, 1}, paddle::DataType::FLOAT32, paddle::CPUPlace()));
    }
  }
  for (SparseRows* table : tables) table->clear();
  return out;
}

// The update of one step from (combined) gradients laid out as gru4rec_backward_step gives
// them; repeated rows (several workers touched the item) are summed first. Returns a dummy.
std::vector<paddle::Tensor> Gru4recUpdateStep(
    const std::vector<paddle::Tensor>& params, const std::vector<paddle::Tensor>& slots, const paddle::Tensor& dense,
    const paddle::Tensor& item_rows, const paddle::Tensor& item_grads, const paddle::Tensor& bias_rows,
    const paddle::Tensor& bias_grads, const paddle::Tensor& input_rows, const paddle::Tensor& input_grads,
    int embedding, int optimizer, float lr, float momentum) {
  OpSetup op(params, embedding);
  Net& net = op.net;
  Scratch& sc = op.sc;
  attach_slots(net, slots, optimizer, momentum);
  const Settings st{embedding, 0, optimizer, 1, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, lr, momentum, 0};
  Trainer trainer(net, op.layers, sc, st, op.members, Team::get().capacity(), nullptr);
  for (auto& tmp : sc.member_tmp) tmp.resize(std::max(net.d, 3 * net.total_h + net.in0));
  PD_CHECK(dense.numel() == net.dense_size, "dense gradient of ", dense.numel(), " values for ", net.dense_size);
  std::memcpy(sc.dense_grad.data(), dense.data<float>(), sizeof(float) * net.dense_size);
  const paddle::Tensor* rows[3] = {&item_rows, &bias_rows, &input_rows};
  const paddle::Tensor* grads[3] = {&item_grads, &bias_grads, &input_grads};
  std::vector<SparseRows*> tables = trainer.sparse_tables();
  for (size_t k = 0; k < tables.size(); ++k) {
    const int64_t m = rows[k]->numel();
    PD_CHECK(grads[k]->numel() == m * tables[k]->width, "sparse gradient ", k, ": ", grads[k]->numel(),
             " values for ", m, " rows of ", tables[k]->width);
    const int64_t* ids = rows[k]->data<int64_t>();
    check_ids(ids, m, net.n_items, "gradient rows");
    const float* g = grads[k]->data<float>();
    tables[k]->clear();
    for (int64_t r = 0; r < m; ++r) tables[k]->add(ids[r], g + r * tables[k]->width);
    tables[k]->finish();
  }
  trainer.update();
  auto done = paddle::empty({1}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  done.data<float>()[0] = 0.f;
  return {done};
}

// Evaluation over a batch of session-parallel steps: every row's state is scored against
// ALL items (scores + score_mask, which is -inf for items never seen in training).
// Rows with a target give the number of items scoring strictly higher and equal (the target
// included), from which the caller derives the rank for any tie mode; rows whose session
// ended (target -1) give their top-k items, best first (ties: lower item id first).
std::vector<paddle::Tensor> Gru4recEvalSteps(const std::vector<paddle::Tensor>& params, const paddle::Tensor& hidden,
                                             const paddle::Tensor& step_offsets, const paddle::Tensor& inputs,
                                             const paddle::Tensor& targets, const paddle::Tensor& carry,
                                             const paddle::Tensor& score_mask, int embedding, int topk) {
  const int members = team_size();
  Team::get().ensure(members);
  const int capacity = Team::get().capacity();
  MklThreads one_thread(1);
  static thread_local std::vector<Layer> layers;
  static thread_local std::vector<float> prev_hidden, next_hidden, h_in, x0, base_buffer;
  static thread_local std::vector<std::vector<float>> member_scores;  // per thread: a row tile's scores
  // what the helper threads' lambdas use must be named through references: a lambda naming a
  // thread_local directly would see the helper thread's own (empty) copy
  std::vector<float>& base = base_buffer;
  std::vector<std::vector<float>>& tile_scores = member_scores;
  Net net = parse_net(params, embedding, layers);
  const int64_t n_items = net.n_items;
  const int d = net.d, total_h = net.total_h, in0 = net.in0;
  const int64_t n_steps = step_offsets.numel() - 1;
  const int64_t* offs = step_offsets.data<int64_t>();
  const int64_t* in_ids = inputs.data<int64_t>();
  const int64_t* tg_ids = targets.data<int64_t>();
  const int64_t* car = carry.data<int64_t>();
  check_ids(in_ids, inputs.numel(), n_items, "inputs");
  int64_t n_targets = 0, n_ended = 0;
  for (int64_t i = 0; i < targets.numel(); ++i) {
    PD_CHECK(tg_ids[i] >= -1 && tg_ids[i] < n_items, "targets holds item id ", tg_ids[i], " outside [0, ", n_items,
             ")");
    if (tg_ids[i] >= 0)
      ++n_targets;
    else
      ++n_ended;
  }
  const int k = (int)std::min<int64_t>(topk, n_items);
  auto higher_t = paddle::empty({n_targets}, paddle::DataType::INT64, paddle::CPUPlace());
  auto equal_t = paddle::empty({n_targets}, paddle::DataType::INT64, paddle::CPUPlace());
  auto topk_ids_t = paddle::empty({n_ended, (int64_t)k}, paddle::DataType::INT64, paddle::CPUPlace());
  auto topk_scores_t = paddle::empty({n_ended, (int64_t)k}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  int64_t* higher = higher_t.data<int64_t>();
  int64_t* equal = equal_t.data<int64_t>();
  int64_t* top_ids = topk_ids_t.data<int64_t>();
  float* top_scores = topk_scores_t.data<float>();

  // item bias + mask, the starting value of every score row
  base.resize(n_items);
  const float* bias = net.p[net.item_bias].value;
  const float* mask = score_mask.data<float>();
  for (int64_t j = 0; j < n_items; ++j) base[j] = bias[j] + mask[j];

  int64_t prev_rows = hidden.numel() ? hidden.shape()[0] : 0;
  prev_hidden.assign(hidden.data<float>(), hidden.data<float>() + prev_rows * total_h);
  int64_t rows = 0, t_out = 0, e_out = 0;
  std::vector<int64_t> slot;
  for (int64_t s = 0; s < n_steps; ++s) {
    const int64_t lo = offs[s];
    rows = offs[s + 1] - lo;
    const int n = (int)rows;
    const int64_t* x_ids = in_ids + lo;
    h_in.assign((int64_t)n * total_h, 0.f);
    for (int i = 0; i < n; ++i) {
      const int64_t c = car[lo + i];
      PD_CHECK(c < prev_rows, "carry row ", c, " is beyond the previous step's ", prev_rows, " rows");
      if (c >= 0) std::memcpy(&h_in[(int64_t)i * total_h], &prev_hidden[c * total_h], sizeof(float) * total_h);
    }
    if (!net.one_hot) {
      const float* table = net.p[net.separate ? 0 : net.item_emb].value;
      x0.resize((int64_t)n * in0);
      for (int i = 0; i < n; ++i) std::memcpy(&x0[(int64_t)i * in0], table + x_ids[i] * in0, sizeof(float) * in0);
    }
    next_hidden.assign((int64_t)n * total_h, 0.f);
    int h_off = 0;
    for (int l = 0; l < net.n_layers; ++l) {
      Layer& L = layers[l];
      L.resize(n, false);
      L.x = l > 0 ? layers[l - 1].out.data() : (net.one_hot ? nullptr : x0.data());
      layer_forward(L, net.p, 0, n, h_in.data(), total_h, h_off, x_ids);
      for (int i = 0; i < n; ++i)
        std::memcpy(&next_hidden[(int64_t)i * total_h + h_off], &L.out[(int64_t)i * L.h], sizeof(float) * L.h);
      h_off += L.h;
    }
    const float* x = layers[net.n_layers - 1].out.data();
    // where each row's result goes: its target's slot, or its ended session's slot
    slot.resize(n);
    for (int i = 0; i < n; ++i) slot[i] = tg_ids[lo + i] >= 0 ? t_out++ : e_out++;
    // per tile of kEvalRows rows: the products only (bias + mask, `base`, small enough to stay in
    // cache, is added while ranking instead of being copied into every row first), then the ranks
    const int64_t row_tiles = (n + kEvalRows - 1) / kEvalRows;
    const int used = (int)std::min<int64_t>(members, row_tiles);
    tile_scores.resize(capacity);
    for (int m = 0; m < (used > 1 ? capacity : 1); ++m) tile_scores[m].resize(kEvalRows * n_items);
    const float* item_matrix = net.p[net.item_emb].value;
    parallel_for(members, row_tiles, [&](int64_t t, int m) {
      const int64_t r0 = t * kEvalRows, r1 = std::min<int64_t>(n, r0 + kEvalRows);
      float* scores = tile_scores[m].data();
      gemm(false, true, (int)(r1 - r0), (int)n_items, d, x + r0 * d, d, item_matrix, d, scores, (int)n_items);
      std::vector<int64_t> best_ids(k);
      std::vector<float> best_scores(k);
      for (int64_t i = r0; i < r1; ++i) {
        float* row = &scores[(i - r0) * n_items];
        const float* b = base.data();
        const int64_t t_id = tg_ids[lo + i];
        if (t_id >= 0) {
          const float ts = row[t_id] + b[t_id];
          if (std::isnan(ts)) {  // reported by the caller, which knows what to tell the user
            higher[slot[i]] = -1;
            equal[slot[i]] = 0;
            continue;
          }
          int32_t hi = 0, eq = 0;  // 32-bit counters: the loop vectorises
          for (int64_t j = 0; j < n_items; ++j) {
            const float v = row[j] + b[j];
            hi += v > ts;
            eq += v == ts;
          }
          higher[slot[i]] = hi;
          equal[slot[i]] = eq;
        } else {
          // keep the k best in descending order; most items fail the first comparison
          int filled = 0;
          for (int64_t j = 0; j < n_items; ++j) {
            const float v = row[j] + b[j];
            if (filled == k && !(v > best_scores[k - 1])) continue;
            int pos = filled < k ? filled++ : k - 1;
            while (pos > 0 && v > best_scores[pos - 1]) {
              best_scores[pos] = best_scores[pos - 1];
              best_ids[pos] = best_ids[pos - 1];
              --pos;
            }
            best_scores[pos] = v;
            best_ids[pos] = j;
          }
          std::memcpy(top_ids + slot[i] * k, best_ids.data(), sizeof(int64_t) * k);
          std::memcpy(top_scores + slot[i] * k, best_scores.data(), sizeof(float) * k);
        }
      }
    });
    prev_hidden.swap(next_hidden);
    prev_rows = n;
  }
  auto hidden_out = paddle::empty({rows, (int64_t)total_h}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  std::memcpy(hidden_out.data<float>(), prev_hidden.data(), sizeof(float) * rows * total_h);
  return {higher_t, equal_t, topk_ids_t, topk_scores_t, hidden_out};
}

// Shared negative items by Walker's alias method (item `column` kept with probability
// accept[column], else alias[column]), drawn counter-based: draw k of block `block` of the stream
// depends on (key, block, k) only, so any range of a block can be drawn on its own, the threads
// split it any way, and model.py's numpy twin (draw_negatives) gives the same ids.
// Draws start .. start + count - 1: int64 [count].
std::vector<paddle::Tensor> Gru4recDrawNegatives(const paddle::Tensor& accept, const paddle::Tensor& alias,
                                                 int64_t key, int64_t block, int64_t start, int64_t count) {
  const int64_t n = accept.numel();
  PD_CHECK(n > 0 && alias.numel() == n, "alias table: ", n, " acceptance values and ", alias.numel(), " aliases");
  PD_CHECK(n < ((int64_t)1 << 32), "alias table of ", n, " items: at most 2^32 - 1");
  PD_CHECK(count >= 0 && start >= 0, "negative samples ", start, " + ", count);
  const int members = team_size();
  Team::get().ensure(members);
  auto out = paddle::empty({count}, paddle::DataType::INT64, paddle::CPUPlace());
  int64_t* ids = out.data<int64_t>();
  const float* keep = accept.data<float>();
  const int64_t* other = alias.data<int64_t>();
  const uint64_t base = mix64(mix64((uint64_t)key) ^ mix64((uint64_t)block + 1));
  constexpr int64_t kDraws = (int64_t)1 << 16;  // draws per task
  parallel_for(members, (count + kDraws - 1) / kDraws, [&](int64_t t, int) {
    const int64_t k1 = std::min(count, (t + 1) * kDraws);
    for (int64_t k = t * kDraws; k < k1; ++k) {
      const uint64_t h = mix64(base + (uint64_t)(start + k + 1) * 0x9E3779B97F4A7C15ULL);
      const int64_t column = (int64_t)(((h >> 32) * (uint64_t)n) >> 32);  // uniform in [0, n)
      const float coin = (float)(h & 0xFFFFFFu) * (1.0f / 16777216.0f);   // uniform in [0, 1), 24 bits
      ids[k] = coin < keep[column] ? column : other[column];
    }
  });
  return {out};
}

namespace {

// The operators' attributes, in order; csrc/kernel.py lists the same names (checked at load).
const std::vector<std::string> kTrainAttrs = {
    "embedding: int", "loss_kind: int", "optimizer: int", "batch_size: int", "dropout_embed: float",
    "dropout_hidden: float", "logq: float", "sample_alpha: float", "bpreg: float", "elu: float", "lr: float",
    "momentum: float", "seed: int64_t"};
const std::vector<std::string> kEvalAttrs = {"embedding: int", "topk: int"};
const std::vector<std::string> kApplyAttrs = {"embedding: int", "optimizer: int", "lr: float", "momentum: float"};

std::string attr_names(const std::vector<std::string>& attrs) {
  std::string out;
  for (const std::string& a : attrs) out += (out.empty() ? "" : ",") + a.substr(0, a.find(':'));
  return out;
}

}  // namespace

// This library's codes and attributes as text, for csrc/kernel.py to compare with its own table.
std::vector<paddle::Tensor> Gru4recLayout(const paddle::Tensor&) {
  char eps[32];
  std::snprintf(eps, sizeof(eps), "%g", (double)kAdagradEps);
  const std::string text =
      "embedding:shared=" + std::to_string(kShared) + ",separate=" + std::to_string(kSeparate) +
      ",none=" + std::to_string(kOneHot) + ";loss:cross-entropy=" + std::to_string(kCrossEntropy) +
      ",bpr-max=" + std::to_string(kBprMax) + ",top1-max=" + std::to_string(kTop1Max) +
      ",full_softmax=" + std::to_string(kFullSoftmax) + ";optimizer:adagrad=" + std::to_string(kAdagrad) +
      ",sgd=" + std::to_string(kSgd) + ";adagrad_eps:" + eps + ";train_attrs:" + attr_names(kTrainAttrs) +
      ";eval_attrs:" + attr_names(kEvalAttrs) + ";apply_attrs:" + attr_names(kApplyAttrs);
  auto out = paddle::empty({(int64_t)text.size()}, paddle::DataType::UINT8, paddle::CPUPlace());
  std::memcpy(out.data<uint8_t>(), text.data(), text.size());
  return {out};
}

PD_BUILD_OP(gru4rec_train_steps)
    .Inputs({paddle::Vec("Params"), paddle::Vec("Slots"), "Hidden", "StepOffsets", "Inputs", "Targets", "Carry",
             "Samples", "LogSupport"})
    .Outputs({"Losses", "HiddenOut"})
    .Attrs(std::vector<std::string>(kTrainAttrs))
    .SetKernelFn(PD_KERNEL(Gru4recTrainSteps));

PD_BUILD_OP(gru4rec_eval_steps)
    .Inputs({paddle::Vec("Params"), "Hidden", "StepOffsets", "Inputs", "Targets", "Carry", "ScoreMask"})
    .Outputs({"Higher", "Equal", "TopkIds", "TopkScores", "HiddenOut"})
    .Attrs(std::vector<std::string>(kEvalAttrs))
    .SetKernelFn(PD_KERNEL(Gru4recEvalSteps));

PD_BUILD_OP(gru4rec_backward_step)
    .Inputs({paddle::Vec("Params"), "Hidden", "Inputs", "Targets", "Carry", "Samples", "LogSupport"})
    .Outputs({"Loss", "HiddenOut", "DenseGrad", "ItemRows", "ItemGrads", "BiasRows", "BiasGrads", "InputRows",
              "InputGrads"})
    .Attrs(std::vector<std::string>(kTrainAttrs))
    .SetKernelFn(PD_KERNEL(Gru4recBackwardStep));

PD_BUILD_OP(gru4rec_update_step)
    .Inputs({paddle::Vec("Params"), paddle::Vec("Slots"), "DenseGrad", "ItemRows", "ItemGrads", "BiasRows",
             "BiasGrads", "InputRows", "InputGrads"})
    .Outputs({"Done"})
    .Attrs(std::vector<std::string>(kApplyAttrs))
    .SetKernelFn(PD_KERNEL(Gru4recUpdateStep));

PD_BUILD_OP(gru4rec_draw_negatives)
    .Inputs({"Accept", "Alias"})
    .Outputs({"Ids"})
    .Attrs({"key: int64_t", "block: int64_t", "start: int64_t", "count: int64_t"})
    .SetKernelFn(PD_KERNEL(Gru4recDrawNegatives));

PD_BUILD_OP(gru4rec_layout)
    .Inputs({"Unused"})
    .Outputs({"Text"})
    .SetKernelFn(PD_KERNEL(Gru4recLayout));
