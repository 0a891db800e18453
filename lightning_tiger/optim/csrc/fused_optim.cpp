// Fused multi-tensor Tiger and Lion steps for CPU tensors (lightning_tiger.optim._fused).
//
// One call updates a whole list of tensors. Work is cut into (tensor, block) items of <= kBlock elements so
// that one huge tensor and many small ones both keep every thread busy; threads come from ATen's intra-op pool
// (at::parallel_for, i.e. OpenMP in the usual builds), so torch.set_num_threads() applies.
//
// Tiger needs two facts about a tensor before its momentum may be written: whether its whole gradient is
// finite (the non-finite rule keeps m EXACTLY unchanged, so no optimistic write is allowed) and, for the
// RMS-relative learning rate, the sum of squares of theta before the update. Both are reductions over the
// whole tensor, so each tensor is processed in two phases:
//   phase A  (read only)  isfinite(g), and sum(theta^2) per block for whole-tensor-RMS tensors (unless the
//                         caller passes a cached value, see _fused.py);
//   phase B  (update)     the element-wise update, using the phase-A results.
// A "small" tensor (phase-A bytes, g plus theta when the RMS is recomputed, within `group_bytes`) is handled
// whole by one thread, phase B right after phase A, so phase B re-reads g (and theta) from that core's cache,
// not from DRAM: the update moves the minimal 20 bytes per fp32 parameter from memory (12 for a non-final
// micro-step), and needs no synchronisation: all small tensors together cost one fork of the thread pool.
// A "big" tensor is shared by all threads (its blocks split evenly), and is read twice from memory (+4 bytes
// per parameter, +8 when its RMS is recomputed); phase B walks each thread's range backwards so that the part
// phase A read last is still cached. Phase B of one big tensor and phase A of the next share a fork.
// Per-row RMS (lr_mode 2) is computed row by row inside phase B (a row is re-read from L1/L2).
//
// Reductions are deterministic: a block's sum of squares uses 16 fixed float lanes combined in a fixed order
// in double, and block sums are added in block order, whatever the thread count. The sum of squares of the
// *new* theta (written back for the caller's RMS cache) uses exactly the same blocks and lanes, so a cached
// value is bit-identical to a recomputed one. Compiled with -ffp-contract=off: no FMA contraction, so results
// do not depend on the ISA the kernels were built for.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 16384;  // elements per work item (64 KiB of fp32): L1/L2-friendly, cheap to schedule
constexpr int kLanes = 16;         // accumulation lanes of the sums of squares (one AVX-512 / two AVX2 vectors)

// ---------------------------------------------------------------------------------------------- dtypes
struct F32 {
  using S = float;
  static inline float ld(S x) { return x; }
  static inline S st(float x) { return x; }
  static inline bool nonfinite(S x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (u & 0x7f800000u) == 0x7f800000u;
  }
};

struct BF16 {
  using S = uint16_t;
  static inline float ld(S x) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  // Round to nearest even, NaN -> 0x7FC0: the same as c10::BFloat16 (torch's .to(torch.bfloat16)).
  static inline S st(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return nan ? static_cast<S>(0x7fc0u) : static_cast<S>(r);
  }
  static inline bool nonfinite(S x) { return (x & 0x7f80u) == 0x7f80u; }
};

struct F16 {
  using S = uint16_t;
#if defined(__FLT16_MAX__) && !defined(LIGHTNING_TIGER_NO_FLOAT16) && (defined(__x86_64__) || defined(__aarch64__))
  // Hardware conversions (F16C / ARMv8 fp16) where the compiler has _Float16; IEEE round-to-nearest-even.
  static inline float ld(S x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return static_cast<float>(h);
  }
  static inline S st(float f) {
    _Float16 h = static_cast<_Float16>(f);
    S x;
    std::memcpy(&x, &h, 2);
    return x;
  }
#else
  static inline float ld(S x) { return c10::detail::fp16_ieee_to_fp32_value(x); }
  static inline S st(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
#endif
  static inline bool nonfinite(S x) { return (x & 0x7c00u) == 0x7c00u; }
};

inline float sign_of(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }

inline double combine(const float* acc) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(acc[l]);
  return s;
}

// Sum of squares of n values with the fixed lane pattern (lane = index % 16 relative to x).
template <class P>
double sumsq(const typename P::S* __restrict x, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = P::ld(x[i + l]);
      acc[l] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = P::ld(x[i]);
    acc[i % kLanes] += v * v;
  }
  return combine(acc);
}

// Sum of squares of a long run, in kBlock pieces added in order (identical to the per-item sums of phase A).
template <class P>
double sumsq_blocks(const typename P::S* x, int64_t n) {
  double s = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) s += sumsq<P>(x + b, std::min(kBlock, n - b));
  return s;
}

template <class P>
bool any_nonfinite(const typename P::S* __restrict g, int64_t n) {
  constexpr int64_t kPiece = 4096;  // early exit granularity
  for (int64_t b = 0; b < n; b += kPiece) {
    const int64_t e = std::min(n, b + kPiece);
    uint32_t acc[kLanes] = {0};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] |= static_cast<uint32_t>(P::nonfinite(g[i + l]));
    }
    for (; i < e; ++i) acc[0] |= static_cast<uint32_t>(P::nonfinite(g[i]));
    uint32_t any = 0;
    for (int l = 0; l < kLanes; ++l) any |= acc[l];
    if (any) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------- kernels
// Tiger, finite gradient, final micro-step, one eta for the whole range:
//   m <- b1*m + b2*g;  theta <- theta*(1 - eta*wd) - eta*sign(m)   (= theta - eta*(sign(m) + wd*theta))
// Returns the sum of squares of the stored new theta when WantSS (lane pattern of sumsq()).
template <class P, class M, bool WantSS>
double tiger_update(typename P::S* __restrict th, const typename P::S* __restrict g, typename M::S* __restrict m,
                    int64_t n, float b1, float b2, float eta, float decay) {
  float acc[kLanes] = {0.f};
  auto one = [&](int64_t i, int lane) {
    const float mn = b1 * M::ld(m[i]) + b2 * P::ld(g[i]);
    const typename M::S ms = M::st(mn);
    m[i] = ms;
    // sign of the momentum as stored (identical to mn for fp32 momentum)
    const float s = sign_of(M::ld(ms));
    const typename P::S ts = P::st(P::ld(th[i]) * decay - eta * s);
    th[i] = ts;
    if (WantSS) {
      const float v = P::ld(ts);
      acc[lane] += v * v;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) one(i + l, l);
  }
  for (; i < n; ++i) one(i, static_cast<int>(i % kLanes));
  return WantSS ? combine(acc) : 0.0;
}

// Non-final micro-step: m <- b1*m + b2*g (theta untouched: 12 bytes per fp32 parameter).
template <class P, class M>
void tiger_fold(const typename P::S* __restrict g, typename M::S* __restrict m, int64_t n, float b1, float b2) {
  for (int64_t i = 0; i < n; ++i) m[i] = M::st(b1 * M::ld(m[i]) + b2 * P::ld(g[i]));
}

// Non-finite rule: theta <- (theta - c)*s + c.
template <class P, bool WantSS>
double tiger_shrink(typename P::S* __restrict th, int64_t n, float c, float s) {
  float acc[kLanes] = {0.f};
  auto one = [&](int64_t i, int lane) {
    const typename P::S ts = P::st((P::ld(th[i]) - c) * s + c);
    th[i] = ts;
    if (WantSS) {
      const float v = P::ld(ts);
      acc[lane] += v * v;
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) one(i + l, l);
  }
  for (; i < n; ++i) one(i, static_cast<int>(i % kLanes));
  return WantSS ? combine(acc) : 0.0;
}

// Lion (paper order): c = b1*m + (1-b1)*g; theta <- theta*(1 - lr*wd) - lr*sign(c); m <- b2*m + (1-b2)*g.
template <class P, class M>
void lion_update(typename P::S* __restrict th, const typename P::S* __restrict g, typename M::S* __restrict m,
                 int64_t n, float b1, float c1, float b2, float c2, float lr, float decay) {
  for (int64_t i = 0; i < n; ++i) {
    const float mo = M::ld(m[i]);
    const float gi = P::ld(g[i]);
    const float c = b1 * mo + c1 * gi;
    th[i] = P::st(P::ld(th[i]) * decay - lr * sign_of(c));
    m[i] = M::st(b2 * mo + c2 * gi);
  }
}

// ---------------------------------------------------------------------------------------------- dispatch
enum class Kind : int { F32F32 = 0, BF16F32, BF16BF16, F16F32, F16F16 };

Kind kind_of(const at::Tensor& p, const at::Tensor& m, int64_t i) {
  const auto pd = p.scalar_type(), md = m.scalar_type();
  if (pd == at::kFloat && md == at::kFloat) return Kind::F32F32;
  if (pd == at::kBFloat16 && md == at::kFloat) return Kind::BF16F32;
  if (pd == at::kBFloat16 && md == at::kBFloat16) return Kind::BF16BF16;
  if (pd == at::kHalf && md == at::kFloat) return Kind::F16F32;
  if (pd == at::kHalf && md == at::kHalf) return Kind::F16F16;
  TORCH_CHECK_TYPE(false, "fused Tiger/Lion: tensor ", i, " has param dtype ", pd, " and momentum dtype ", md,
                   "; supported: param in {float32, bfloat16, float16}, momentum float32 or the param dtype");
  return Kind::F32F32;  // unreachable
}

// Calls f.template operator()<P, M>() for the tensor's (param, momentum) storage types.
template <class F>
decltype(auto) dispatch(Kind k, F&& f) {
  switch (k) {
    case Kind::F32F32: return f.template operator()<F32, F32>();
    case Kind::BF16F32: return f.template operator()<BF16, F32>();
    case Kind::BF16BF16: return f.template operator()<BF16, BF16>();
    case Kind::F16F32: return f.template operator()<F16, F32>();
    default: return f.template operator()<F16, F16>();
  }
}

void check_lists(const at::TensorList& params, const at::TensorList& grads, const at::TensorList& moms,
                 std::vector<Kind>& kinds) {
  TORCH_CHECK_VALUE(grads.size() == params.size() && moms.size() == params.size(),
                    "fused Tiger/Lion: params, grads and moms must have equal lengths, got ", params.size(), ", ",
                    grads.size(), ", ", moms.size());
  kinds.resize(params.size());
  for (const auto i : c10::irange(params.size())) {
    const auto &p = params[i], &g = grads[i], &m = moms[i];
    TORCH_CHECK_VALUE(p.device().is_cpu() && g.device().is_cpu() && m.device().is_cpu(),
                      "fused Tiger/Lion: tensor ", i, " is not on the CPU");
    TORCH_CHECK_VALUE(p.layout() == at::kStrided && g.layout() == at::kStrided && m.layout() == at::kStrided,
                      "fused Tiger/Lion: tensor ", i, " is not dense");
    TORCH_CHECK_VALUE(p.is_contiguous() && g.is_contiguous() && m.is_contiguous(), "fused Tiger/Lion: tensor ", i,
                      " (param, grad or momentum) is not contiguous");
    TORCH_CHECK_VALUE(g.numel() == p.numel() && m.numel() == p.numel(), "fused Tiger/Lion: tensor ", i,
                      " has mismatched sizes: param ", p.sizes(), ", grad ", g.sizes(), ", momentum ", m.sizes());
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), "fused Tiger/Lion: grad ", i, " has dtype ",
                     g.scalar_type(), " but its param has ", p.scalar_type());
    kinds[i] = kind_of(p, m, static_cast<int64_t>(i));
  }
}

void bump_versions(const at::TensorList& ts) {
  for (const auto& t : ts) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

struct Item {
  int64_t tensor;
  int64_t begin;  // element offsets; for per-row tensors aligned to rows
  int64_t end;
};

// Splits items [0, n) into `parts` contiguous ranges of about equal element counts.
std::vector<int64_t> balance(const std::vector<Item>& items, int64_t lo, int64_t hi, int64_t parts) {
  int64_t total = 0;
  for (int64_t j = lo; j < hi; ++j) total += items[j].end - items[j].begin + 64;  // +64: per-item overhead
  std::vector<int64_t> cuts(parts + 1, hi);
  cuts[0] = lo;
  int64_t acc = 0, part = 1;
  for (int64_t j = lo; j < hi && part < parts; ++j) {
    acc += items[j].end - items[j].begin + 64;
    while (part < parts && acc * parts >= total * part) cuts[part++] = j + 1;
  }
  return cuts;
}

// Runs body(j) for items [lo, hi) across the intra-op pool, each thread on one contiguous, cost-balanced range
// (forward or backward). Small ranges run inline: forking the pool costs more than it saves.
template <class Body>
void run_items(const std::vector<Item>& items, int64_t lo, int64_t hi, bool backward, Body&& body) {
  if (hi <= lo) return;
  int64_t elems = 0;
  for (int64_t j = lo; j < hi; ++j) elems += items[j].end - items[j].begin;
  int64_t nthr = at::in_parallel_region() ? 1 : static_cast<int64_t>(at::get_num_threads());
  nthr = std::min<int64_t>({nthr, hi - lo, std::max<int64_t>(1, elems / (kBlock / 2))});
  auto range = [&](int64_t a, int64_t b) {
    if (backward) {
      for (int64_t j = b - 1; j >= a; --j) body(j);
    } else {
      for (int64_t j = a; j < b; ++j) body(j);
    }
  };
  if (nthr <= 1) {
    range(lo, hi);
    return;
  }
  const auto cuts = balance(items, lo, hi, nthr);
  at::parallel_for(0, nthr, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) range(cuts[t], cuts[t + 1]);
  });
}

// ---------------------------------------------------------------------------------------------- Tiger
// flags (uint8 [n], out): per-tensor nonfinite flags.
// sumsq (float64 [n], in/out): in: a cached sum(theta^2) for lr_mode 1 tensors, NaN = recompute;
//   out (when want_sumsq): sum(theta^2) of the theta left by this call for lr_mode 1 tensors, NaN if unknown.
void tiger_step(at::TensorList params, at::TensorList grads, at::TensorList moms, at::IntArrayRef lr_modes,
                at::ArrayRef<double> lrs, at::ArrayRef<double> wds, at::ArrayRef<double> centers,
                at::ArrayRef<double> floors, double b1d, double b2d, bool update, double shrink,
                const at::Tensor& flags_t, const at::Tensor& sumsq_t, bool want_sumsq, int64_t group_bytes) {
  std::vector<Kind> kinds;
  check_lists(params, grads, moms, kinds);
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(lr_modes.size()) == n && static_cast<int64_t>(lrs.size()) == n &&
                        static_cast<int64_t>(wds.size()) == n && static_cast<int64_t>(centers.size()) == n &&
                        static_cast<int64_t>(floors.size()) == n,
                    "fused Tiger: lr_modes, lrs, weight_decays, centers and rms_floor need one entry per tensor");
  TORCH_CHECK_VALUE(flags_t.scalar_type() == at::kByte && flags_t.numel() == n && flags_t.is_contiguous(),
                    "fused Tiger: flags must be a contiguous uint8 tensor with one entry per tensor");
  TORCH_CHECK_VALUE(sumsq_t.scalar_type() == at::kDouble && sumsq_t.numel() == n && sumsq_t.is_contiguous(),
                    "fused Tiger: sumsq must be a contiguous float64 tensor with one entry per tensor");
  uint8_t* flags = flags_t.data_ptr<uint8_t>();
  double* ss = sumsq_t.data_ptr<double>();

  // Effective per-tensor modes: a per-row RMS of a tensor with ndim < 2 is its whole-tensor RMS (as in the
  // reference), and per-row tensors need their row width.
  std::vector<int> mode(n);
  std::vector<int64_t> cols(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lm = lr_modes[i];
    TORCH_CHECK_VALUE(lm >= 0 && lm <= 2, "fused Tiger: lr_modes[", i, "] must be 0, 1 or 2, got ", lm);
    const auto& p = params[i];
    mode[i] = static_cast<int>(lm);
    if (lm == 2) {
      if (p.dim() < 2) {
        mode[i] = 1;
      } else {
        cols[i] = p.size(0) > 0 ? p.numel() / p.size(0) : 0;
      }
    }
  }

  const float b1 = static_cast<float>(b1d), b2 = static_cast<float>(b2d), s = static_cast<float>(shrink);
  std::vector<std::atomic<uint8_t>> bad(n);
  for (int64_t i = 0; i < n; ++i) bad[i].store(0, std::memory_order_relaxed);
  std::vector<double> rms_sum(n, std::nan(""));  // sum(theta^2) before the update (mode 1)
  std::vector<double> new_ss(n, std::nan(""));
  std::vector<uint8_t> need_rms(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (mode[i] == 1 && update) {
      if (std::isnan(ss[i])) {
        need_rms[i] = 1;
      } else {
        rms_sum[i] = ss[i];
      }
    }
  }

  // ---- work items of every tensor: blocks of kBlock elements (whole rows for per-row tensors)
  std::vector<Item> items;
  std::vector<int64_t> first_item(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    first_item[i] = static_cast<int64_t>(items.size());
    const int64_t numel = params[i].numel();
    int64_t step = kBlock;
    if (mode[i] == 2 && update) step = std::max<int64_t>(1, kBlock / std::max<int64_t>(cols[i], 1)) * cols[i];
    for (int64_t b = 0; b < numel; b += step) items.push_back({i, b, std::min(numel, b + step)});
  }
  first_item[n] = static_cast<int64_t>(items.size());
  const int64_t nitems = first_item[n];
  int64_t total_elems = 0;
  for (int64_t i = 0; i < n; ++i) total_elems += params[i].numel();
  int64_t nthr = at::in_parallel_region() ? 1 : static_cast<int64_t>(at::get_num_threads());
  nthr = std::max<int64_t>(1, std::min<int64_t>(nthr, total_elems / (kBlock / 2)));
  // A tensor whose phase-A bytes exceed the budget is "big": all threads share it, phase A and B in separate
  // forks. Every other tensor is "small": one thread runs its phase A and then its phase B back to back (the
  // data is still in that core's cache) with no synchronisation at all, so all small tensors cost one fork.
  std::vector<int64_t> small, big;
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size()) * (need_rms[i] ? 2 : 1);
    (nthr > 1 && bytes > group_bytes ? big : small).push_back(i);
  }
  // contiguous runs of small tensors per thread, balanced by element count
  std::vector<int64_t> small_cuts(nthr + 1, static_cast<int64_t>(small.size()));
  {
    int64_t tot = 0, acc = 0, part = 1;
    for (const int64_t i : small) tot += params[i].numel() + 64;
    small_cuts[0] = 0;
    for (int64_t k = 0; k < static_cast<int64_t>(small.size()) && part < nthr; ++k) {
      acc += params[small[k]].numel() + 64;
      while (part < nthr && acc * nthr >= tot * part) small_cuts[part++] = k + 1;
    }
  }
  std::vector<std::vector<int64_t>> big_cuts;
  for (const int64_t i : big) big_cuts.push_back(balance(items, first_item[i], first_item[i + 1], nthr));

  std::vector<double> partial(nitems, 0.0);   // per item: sum of squares of theta (phase A)
  std::vector<double> partial2(nitems, 0.0);  // per item: sum of squares of the new theta (phase B)
  std::vector<float> eta(n, 0.f), decay(n, 1.f);

  // phase A of one item: finiteness of g, and sum(theta^2) where the RMS must be recomputed
  auto phase_a = [&](int64_t j) {
    const Item& it = items[j];
    const int64_t i = it.tensor, len = it.end - it.begin;
    dispatch(kinds[i], [&]<class P, class M>() {
      if (!bad[i].load(std::memory_order_relaxed)) {
        const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
        if (any_nonfinite<P>(g, len)) bad[i].store(1, std::memory_order_relaxed);
      }
      if (need_rms[i]) {
        const auto* th = static_cast<const typename P::S*>(params[i].data_ptr()) + it.begin;
        partial[j] = sumsq<P>(th, len);
      }
    });
  };
  // after phase A of a tensor: reduce its RMS sums in block order (deterministic), its eta and decay
  auto finish_a = [&](int64_t i) {
    if (need_rms[i]) {
      double acc = 0.0;
      for (int64_t j = first_item[i]; j < first_item[i + 1]; ++j) acc += partial[j];
      rms_sum[i] = acc;
    }
    if (mode[i] == 1 && update) {
      const int64_t numel = params[i].numel();
      const float rms = numel > 0 ? static_cast<float>(std::sqrt(rms_sum[i] / static_cast<double>(numel))) : 0.f;
      eta[i] = static_cast<float>(lrs[i]) * std::max(rms, static_cast<float>(floors[i]));
    } else {
      eta[i] = static_cast<float>(lrs[i]);
    }
    decay[i] = 1.f - eta[i] * static_cast<float>(wds[i]);
  };
  // phase B of one item: the update
  auto phase_b = [&](int64_t j) {
    const Item& it = items[j];
    const int64_t i = it.tensor, len = it.end - it.begin;
    const bool want = want_sumsq && mode[i] == 1;
    dispatch(kinds[i], [&]<class P, class M>() {
      auto* th = static_cast<typename P::S*>(params[i].data_ptr()) + it.begin;
      if (bad[i].load(std::memory_order_relaxed)) {
        const float c = static_cast<float>(centers[i]);
        partial2[j] = want ? tiger_shrink<P, true>(th, len, c, s) : tiger_shrink<P, false>(th, len, c, s);
        return;
      }
      const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
      auto* m = static_cast<typename M::S*>(moms[i].data_ptr()) + it.begin;
      if (!update) {
        tiger_fold<P, M>(g, m, len, b1, b2);
        return;
      }
      if (mode[i] == 2) {
        const int64_t w = cols[i];
        const float lr = static_cast<float>(lrs[i]), wd = static_cast<float>(wds[i]);
        const float fl = static_cast<float>(floors[i]);
        for (int64_t r = 0; r < len; r += w) {
          const float rms = static_cast<float>(std::sqrt(sumsq_blocks<P>(th + r, w) / static_cast<double>(w)));
          const float e = lr * std::max(rms, fl);
          tiger_update<P, M, false>(th + r, g + r, m + r, w, b1, b2, e, 1.f - e * wd);
        }
        return;
      }
      partial2[j] = want ? tiger_update<P, M, true>(th, g, m, len, b1, b2, eta[i], decay[i])
                         : tiger_update<P, M, false>(th, g, m, len, b1, b2, eta[i], decay[i]);
    });
  };
  // after phase B of a tensor: its flag, and the sum of squares of its new theta for the caller's cache
  auto finish_b = [&](int64_t i) {
    flags[i] = bad[i].load(std::memory_order_relaxed);
    if (!want_sumsq || mode[i] != 1) return;
    if (flags[i] || update) {  // theta was rewritten here: sum of the new values, in block order
      double acc = 0.0;
      for (int64_t j = first_item[i]; j < first_item[i + 1]; ++j) acc += partial2[j];
      new_ss[i] = acc;
    } else {
      new_ss[i] = ss[i];  // finite non-final micro-step: theta untouched, the cached value (or NaN) stays
    }
  };

  // ---- fork f: (f == 0) the small tensors, each thread its own run, A then B per tensor; (f > 0) phase B of
  // big tensor f-1, walked backwards so that what this thread's phase A read last is still cached; then phase A
  // of big tensor f. One fork serves two phases: n_big + 1 forks in all (barriers hurt most on a busy machine).
  const int64_t nbig = static_cast<int64_t>(big.size());
  for (int64_t f = 0; f <= nbig; ++f) {
    auto work = [&](int64_t t) {
      if (f == 0) {
        for (int64_t k = small_cuts[t]; k < small_cuts[t + 1]; ++k) {
          const int64_t i = small[k];
          for (int64_t j = first_item[i]; j < first_item[i + 1]; ++j) phase_a(j);
          finish_a(i);
          for (int64_t j = first_item[i + 1] - 1; j >= first_item[i]; --j) phase_b(j);
          finish_b(i);
        }
      } else {
        const auto& cuts = big_cuts[f - 1];
        for (int64_t j = cuts[t + 1] - 1; j >= cuts[t]; --j) phase_b(j);
      }
      if (f < nbig) {
        const auto& cuts = big_cuts[f];
        for (int64_t j = cuts[t]; j < cuts[t + 1]; ++j) phase_a(j);
      }
    };
    if (nthr <= 1) {
      work(0);
    } else {
      at::parallel_for(0, nthr, 1, [&](int64_t a, int64_t b) {
        for (int64_t t = a; t < b; ++t) work(t);
      });
    }
    if (f > 0) finish_b(big[f - 1]);
    if (f < nbig) finish_a(big[f]);
  }
  for (int64_t i = 0; i < n; ++i) ss[i] = want_sumsq ? new_ss[i] : std::nan("");
  bump_versions(params);
  bump_versions(moms);
}

// ---------------------------------------------------------------------------------------------- Lion
void lion_step(at::TensorList params, at::TensorList grads, at::TensorList moms, double lr, double beta1,
               double beta2, double wd) {
  std::vector<Kind> kinds;
  check_lists(params, grads, moms, kinds);
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<Item> items;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    for (int64_t b = 0; b < numel; b += kBlock) items.push_back({i, b, std::min(numel, b + kBlock)});
  }
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2);
  const float flr = static_cast<float>(lr), decay = static_cast<float>(1.0 - lr * wd);
  run_items(items, 0, static_cast<int64_t>(items.size()), false, [&](int64_t j) {
    const Item& it = items[j];
    const int64_t i = it.tensor, len = it.end - it.begin;
    dispatch(kinds[i], [&]<class P, class M>() {
      auto* th = static_cast<typename P::S*>(params[i].data_ptr()) + it.begin;
      const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
      auto* m = static_cast<typename M::S*>(moms[i].data_ptr()) + it.begin;
      lion_update<P, M>(th, g, m, len, b1, c1, b2, c2, flr, decay);
    });
  });
  bump_versions(params);
  bump_versions(moms);
}

}  // namespace

TORCH_LIBRARY(lightning_tiger, m) {
  m.def(
      "tiger_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, int[] lr_modes, float[] lrs, "
      "float[] weight_decays, float[] centers, float[] rms_floor, float b1, float b2, bool update, "
      "float shrink_ratio, Tensor(c!) flags, Tensor(d!) sumsq, bool want_sumsq, int group_bytes) -> ()");
  m.def(
      "lion_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, float lr, float beta1, float beta2, "
      "float weight_decay) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_tiger, CPU, m) {
  m.impl("tiger_step_", &tiger_step);
  m.impl("lion_step_", &lion_step);
}
