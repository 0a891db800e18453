// Fused multi-tensor Tiger and Lion steps for CPU tensors (lightning_tiger.optim._fused).
//
// One call updates a whole list of tensors in ONE parallel region of ATen's intra-op pool (at::parallel_for,
// i.e. OpenMP in the usual builds, so torch.set_num_threads() applies). Work is cut into (tensor, block) items
// of <= kBlock elements that threads claim dynamically (atomic counters): on a shared machine one thread is
// often slower than another, and a static split would make every thread wait for the slowest.
//
// The non-finite rule of Tiger is per tensor: if any element of g_i is NaN/inf, m_i stays unchanged and theta_i
// shrinks toward its centre. Two ways to honour it (argument `exact`):
//
//  * optimistic, one pass (exact = false, the default of the Python wrapper): each block checks g piece by piece
//    (kCheckPiece elements, still in L1 when the update reads them) before writing the piece, and stops at the
//    first piece holding a non-finite value; blocks of a tensor already known to be non-finite are skipped.
//    After the pass, the blocks of a flagged tensor that were written are rolled back by inverting the update
//    (m = (m' - b2*g)/b1, theta = (theta' + eta*sign(m'))/decay, in fp32), then theta shrinks; in a tensor of
//    several blocks every element with a finite g gets that update-and-invert round trip, written or not, so
//    the result does not depend on thread timing (see tiger_rollback). The update moves the minimal 20 bytes
//    per fp32 parameter (12 for a non-final micro-step); the price is that a rolled-back m and theta equal the
//    old values only to within float rounding (a few ulp of |m| + |b2*g| and of |theta|), on non-finite steps
//    only. Finite steps are bit-identical to `exact`.
//  * exact, two phases (exact = true, and always where the inversion would be inaccurate: b1 < 0.5): phase A
//    reads g (isfinite) before phase B writes anything. A "small" tensor (phase-A bytes within `group_bytes`)
//    is handled whole by one thread, B right after A from that core's caches; a "big" one is shared by all
//    threads and B starts once every block of A is done (so g is read twice from memory).
//
// The RMS of theta before the update (lr_mode 1) needs its own read of theta unless the caller passes the sum
// of squares that this kernel returned for the theta it wrote at the previous step (`sumsq`, validated by a
// fingerprint of sampled elements, see _fused.py). Tensors whose RMS must be recomputed go through the two-phase
// path (phase A reads theta and g together). Per-row RMS (lr_mode 2) is computed row by row from L1.
//
// Reductions are deterministic: a block's sum of squares uses 16 fixed float lanes combined in a fixed order
// in double, and block sums are added in block order, whatever the thread count or schedule. The sum of
// squares of the *new* theta (returned for the caller's cache) uses exactly the same blocks and lanes, so a
// cached value is bit-identical to a recomputed one. Compiled with -ffp-contract=off: no FMA contraction, so
// results do not depend on the ISA the kernels were built for.
//
// Speed: a step is a stream over a few arrays. The fp32/bf16 loops run on explicit 16-lane vectors (section
// SIMD: bf16 widening/narrowing, round to nearest even and the stochastic-rounding hash as integer vector
// operations, no per-element branches) and prefetch kPrefetchBytes ahead in software; fp16 stays scalar.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 16384;  // elements per work item (64 KiB of fp32): L1/L2-friendly, cheap to schedule

// ---------------------------------------------------------------------------------------------- SIMD
// The loops over fp32/bf16 data work on 16 lanes at a time with GCC/Clang vector extensions (one AVX-512
// register, two AVX2 ones, four SSE ones: the compiler splits the type for the ISA it targets). Written as
// vectors rather than left to the auto-vectorizer, which handled the mixed 16/32-bit lanes of bf16 poorly (and
// versioned every 16-element group for aliasing). Lane l of a vector holds element i + l, so the lanes of the
// sums of squares are the same as in the scalar code (lane = index % 16) and every element goes through the
// same IEEE operations in the same order (no FMA: -ffp-contract=off): the results are bit-identical to the
// scalar code, which still handles the tails (n % 16) and the fp16 types.
constexpr int kLanes = 16;  // lanes of the vectors, of the sums of squares and of the finiteness checks
#if defined(__GNUC__) && !defined(__clang__)
// Without AVX-512 GCC notes that passing 64-byte vectors by value "changes the ABI": irrelevant here, every
// function taking them is internal to this file (anonymous namespace) and inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float VF __attribute__((vector_size(64)));
typedef uint32_t VU __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));
typedef uint16_t VH __attribute__((vector_size(32)));
typedef uint16_t VW __attribute__((vector_size(64)));  // 32 lanes of 16 bits (the finiteness scan of bf16)

template <class V>
inline V loadv(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // unaligned load
  return v;
}
template <class V>
inline void storev(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
template <class To, class From>
inline To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}
inline VF splat(float x) { return VF{} + x; }
inline VU splat(uint32_t x) { return VU{} + x; }

// ---------------------------------------------------------------------------------------------- dtypes
// S: the storage type; ld/st: one element to/from float (st rounds to nearest even); nonfinite: NaN or ±inf.
// kSimd types also have ldv (16 elements to floats), nonfinite_v (a -1/0 mask per lane), exp_max/exp_all_ones
// (the finiteness scan) and stv/stv2 (store 16/32 rounded values given as 32-bit "bits", see BF16).
struct F32 {
  using S = float;
  static constexpr bool kSimd = true;
  static inline float ld(S x) { return x; }
  static inline S st(float x) { return x; }
  static inline bool nonfinite(S x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (u & 0x7f800000u) == 0x7f800000u;
  }
  static inline VF ldv(const S* p) { return loadv<VF>(p); }
  static inline VI nonfinite_v(const S* p) { return (loadv<VU>(p) & 0x7f800000u) == 0x7f800000u; }
  // "bits" of 16 rounded values (see BF16): here the floats' own bits
  static inline void stv(S* p, VU bits) { storev(p, bits); }
  static inline void stv2(S* p, VU lo, VU hi) {
    storev(p, lo);
    storev(p + kLanes, hi);
  }
  // finiteness scan: acc = lane-wise max of the exponent fields of kScan elements; some element is NaN/±inf
  // iff a lane of acc ends with the all-ones exponent (two operations per vector instead of four for a mask)
  static constexpr int kScan = 16;
  static inline VU exp_max(VU acc, const S* p) {
    const VU e = loadv<VU>(p) & 0x7f800000u;
    return acc > e ? acc : e;
  }
  static inline bool exp_all_ones(VU acc) {
    const VI hit = acc == 0x7f800000u;
    int any = 0;
    for (int l = 0; l < kLanes; ++l) any |= hit[l];
    return any != 0;
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
  // Round to nearest even, NaN -> 0x7FC0: the same as c10::BFloat16 (torch's .to(torch.bfloat16)). Written
  // with masks, not a branch or a ?: on the result, so that GCC vectorizes the loops that call it.
  static inline S st(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t nan = 0u - static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<S>((r & ~nan) | (0x7fc0u & nan));
  }
  static inline bool nonfinite(S x) { return (x & 0x7f80u) == 0x7f80u; }
  static constexpr bool kSimd = true;
  // 16 bf16 values zero-extended to 32-bit lanes (one vpmovzxwd with AVX-512: GCC's generic widening of the
  // vector type takes several shuffles under its default 256-bit preference)
  static inline VU ldbits(const S* p) {
#if defined(__AVX512F__)
    return bitcast<VU>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
    return __builtin_convertvector(loadv<VH>(p), VU);
#endif
  }
  static inline VF ldv(const S* p) { return bitcast<VF>(ldbits(p) << 16); }  // bf16 -> fp32 is exact: a shift
  static inline VI nonfinite_v(const S* p) { return (ldbits(p) & 0x7f80u) == 0x7f80u; }
  static constexpr int kScan = 32;  // see F32::exp_max; here on 32 lanes of 16 bits
  static inline VU exp_max(VU acc, const S* p) {
    const VW a = bitcast<VW>(acc), e = loadv<VW>(p) & static_cast<uint16_t>(0x7f80u);
    return bitcast<VU>(a > e ? a : e);
  }
  static inline bool exp_all_ones(VU acc) {
    const auto hit = bitcast<VW>(acc) == static_cast<uint16_t>(0x7f80u);
    int any = 0;
    for (int l = 0; l < 32; ++l) any |= hit[l];
    return any != 0;
  }
  // Rounded values are handled as "bits": 32-bit lanes whose high half is the bf16 value (the low half is
  // ignored), so that the float of the stored value is bits & 0xffff0000 and no shift is needed to store.
  // st() on 16 lanes (NaN lanes: x != x)
  static inline VU rn_bits(VF f) {
    const VU u = bitcast<VU>(f);
    return f != f ? VU{} + 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  }
  static inline VF bits_to_float(VU bits) { return bitcast<VF>(bits & 0xffff0000u); }
  // stores the high halves of 16 lanes (vpmovdw with AVX-512)
  static inline void stv(S* p, VU bits) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bitcast<__m512i>(bits >> 16)));
#else
    storev(p, __builtin_convertvector(bits >> 16, VH));
#endif
  }
  // stores the high halves of 32 lanes, lo's then hi's (one vpermt2w with AVX512BW: cheaper than two vpmovdw)
  static inline void stv2(S* p, VU lo, VU hi) {
#if defined(__AVX512BW__)
    const __m512i odd = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27,
                                         25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    _mm512_storeu_si512(p, _mm512_permutex2var_epi16(bitcast<__m512i>(lo), odd, bitcast<__m512i>(hi)));
#else
    stv(p, lo);
    stv(p + kLanes, hi);
#endif
  }
};

struct F16 {
  using S = uint16_t;
  static constexpr bool kSimd = false;
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

// ---------------------------------------------------------------------------------------------- stochastic rounding
// Counter-based random bits, defined in lightning_tiger/optim/stochastic_rounding.py (bit for bit the same):
// bits of flat element index j under a key = bits32(key + j * 0x9E3779B1), bits32 being one multiply-xorshift
// round (the first round of the "lowbias32" hash, C. Wellons, "Prospecting for Hash Functions", 2018; the keys
// themselves are full lowbias32 hashes, computed in Python). They depend on (key, j) only, so results do not depend
// on the thread count, the schedule or how a tensor is cut into items. A bf16 theta adds the high 16 bits, a bf16
// momentum the low 16 bits of the same word (same key: one hash per element serves both), an fp16 value the
// top 24 bits; an fp16 momentum hashes with its own key, key ^ kMomentumSalt.
constexpr uint32_t kGolden = 0x9E3779B1u;
constexpr uint32_t kMomentumSalt = 0x5BD1E995u;  // MOMENTUM_SALT: key of an fp16 momentum = key ^ salt

inline uint32_t bits32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 16;
  return x;
}

// The bits of the element whose flat index j gives jg = j * kGolden mod 2^32 (callers step jg by kGolden).
inline uint32_t sr_bits(uint32_t key, uint32_t jg) { return bits32(key + jg); }


// Stochastic rounding of a float to bf16 (Gupta et al., 2015, eq. 2): add 16 random bits below the kept ones and
// truncate, i.e. round away from zero with probability (|x| - |lo|)/ulp. ±inf stay (their low bits are 0, the
// sum does not carry) and finite values may overflow to ±inf, as in stochastic_round(); NaN -> 0x7FC0 as in
// round to nearest. Branch-free and in 32-bit lanes throughout, so that GCC vectorizes the loops calling it.
// r16: 16 random bits (a half of the element's random bits).
inline uint16_t bf16_sr(float x, uint32_t r16) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t nan = 0u - static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
  return static_cast<uint16_t>((((u + r16) >> 16) & ~nan) | (0x7fc0u & nan));
}

// bits32 on 16 lanes (x = key + jg) without its last step x ^= x >> 16: the "mix" the vector loops compute once
// per element. The high half of the bits is mix >> 16 (the last step leaves it unchanged), the low half
// (mix ^ (mix >> 16)) & 0xFFFF.
inline VU sr_mix_v(VU x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  return x;
}

// sr_mix_v of kj when some rounding of the loop is stochastic (else nothing is computed)
template <bool Need>
inline VU mix_if(VU kj) {
  if constexpr (Need) {
    return sr_mix_v(kj);
  } else {
    (void)kj;
    return VU{};
  }
}

// Stochastic rounding of a float to fp16: between the two fp16 neighbours lo <= x <= hi, hi iff
// u < (x - lo)/(hi - lo) with u = (bits >> 8) * 2^-24; exact values, NaN/inf and magnitudes beyond the largest
// finite fp16 (65504) round to nearest. Same operations, in the same order, as stochastic_round(). The other
// neighbour is the next fp16 value away from x (as std::nextafter on the fp16 grid: +-0 steps to +-2^-24).
// Selects on 32-bit values, no branches: GCC vectorizes it.
inline uint16_t f16_sr(float x, uint32_t bits) {
  const uint16_t near = F16::st(x);
  const float near32 = F16::ld(near);
  const uint32_t nb = near;
  const bool up = near32 > x;  // near is above x: the other neighbour is below (toward -inf)
  const bool zero = (nb & 0x7fffu) == 0;
  const bool neg = (nb & 0x8000u) != 0;
  const uint32_t step = (neg == up) ? nb + 1u : nb - 1u;  // away from zero if near's sign points toward x's side
  const uint32_t other = zero ? (up ? 0x8001u : 0x0001u) : step;
  const uint32_t lo = up ? other : nb, hi = up ? nb : other;
  const float lo32 = F16::ld(static_cast<uint16_t>(lo)), hi32 = F16::ld(static_cast<uint16_t>(hi));
  const float p = (x - lo32) / (hi32 - lo32);
  const float u = static_cast<float>(bits >> 8) * 0x1p-24f;
  const uint32_t res = u < p ? hi : lo;
  const bool keep = near32 == x || F16::nonfinite(near) || !(std::fabs(x) <= 65504.f);  // (NaN fails <=)
  return static_cast<uint16_t>(keep ? nb : res);
}

// A storage type with its rounding: SR = stochastic (bf16/fp16 only), else round to nearest even. Low: a bf16
// momentum, which adds the low half of the element's random bits (its theta adds the high half).
template <class B, bool SR, bool Low = false>
struct Sto : B {
  static constexpr bool kSR = SR;
  static constexpr bool kLow = Low;
  static_assert(!SR || !std::is_same_v<B, F32>, "no stochastic rounding to float32");
  static_assert(!Low || (SR && std::is_same_v<B, BF16>), "the low half serves bf16 stochastic rounding only");
  // x rounded to the storage type; bits: the element's 32 random bits (sr_bits; ignored unless SR)
  static inline typename B::S put(float x, uint32_t bits) {
    if constexpr (SR) {
      if constexpr (std::is_same_v<B, BF16>) {
        return bf16_sr(x, Low ? bits & 0xFFFFu : bits >> 16);
      } else {
        return f16_sr(x, bits);
      }
    } else {
      (void)bits;
      return B::st(x);
    }
  }
  // put() on 16 lanes (kSimd types), without the store: rounds x, sets `bits` for B::stv/stv2 and returns the
  // rounded values as floats (what a load of the stored values gives). mix: the lanes' sr_mix_v (ignored unless
  // SR).
  static inline VF roundv(VF x, VU mix, VU& bits) {
    (void)mix;
    if constexpr (std::is_same_v<B, F32>) {
      bits = bitcast<VU>(x);
      return x;
    } else {
      static_assert(std::is_same_v<B, BF16>, "roundv: fp32 and bf16 only");
      if constexpr (SR) {  // bf16_sr on 16 lanes
        const VU r16 = Low ? (mix ^ (mix >> 16)) & 0xFFFFu : mix >> 16;
        bits = x != x ? VU{} + 0x7fc00000u : bitcast<VU>(x) + r16;
      } else {
        bits = BF16::rn_bits(x);
      }
      return BF16::bits_to_float(bits);
    }
  }
};

// The random bits of one element for theta's (bp) and the momentum's (bm) rounding, jg as in put: one hash under
// theta's key kp when the momentum takes its low half (bf16), a second one under km only for an fp16 momentum.
template <class P, class M>
inline void draw(uint32_t kp, uint32_t km, uint32_t jg, uint32_t& bp, uint32_t& bm) {
  bp = (P::kSR || M::kLow) ? sr_bits(kp, jg) : 0u;
  bm = M::kLow ? bp : (M::kSR ? sr_bits(km, jg) : 0u);
}

// Whether a vector loop over (theta, momentum) types rounds anything stochastically. In the vector loops (fp32 and
// bf16) every stochastic rounding reads the one hash under theta's key: a bf16 momentum's is the low half.
template <class P, class M>
constexpr bool kVecSR = P::kSR || M::kSR;

// Whether a kernel over (param, momentum) types runs on 16-lane vectors (then the scalar code does the tail).
template <class P, class M>
constexpr bool kSimdPair = P::kSimd && M::kSimd;

// Software prefetch of the 32 elements kPrefetchBytes after element i of p (into L1): the loops are long
// streams, and with a dozen vector operations per element group the out-of-order window alone does not reach
// far enough ahead to keep memory busy. Addresses are formed as integers (a prefetch never faults).
constexpr int64_t kPrefetchBytes = 4096;  // 2-8 KiB measured alike (benchmarks/kernel_micro.py), 16 KiB slower
template <class T>
inline void ahead(const T* p, int64_t i) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p + i) + kPrefetchBytes;
  for (size_t b = 0; b < 2 * kLanes * sizeof(T); b += 64) __builtin_prefetch(reinterpret_cast<const void*>(a + b));
}

// The vector loops: body(i, k) for the 16 elements from i, where k (0 or 1) says which half of a pair of
// vectors they are, then store(i, pair) with pair = 2 (32 elements from i: bf16 stores them with one
// instruction) or 1; returns where the scalar tail starts.
template <class Body, class Store>
inline int64_t vec_loop(int64_t n, Body&& body, Store&& store) {
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    body(i, 0);
    body(i + kLanes, 1);
    store(i, 2);
  }
  if (i + kLanes <= n) {
    body(i, 0);
    store(i, 1);
    i += kLanes;
  }
  return i;
}

// Per-tensor keys of a call: theta's and the momentum's (only read where the type rounds stochastically; equal
// for a bf16 momentum, which reads the low half of theta's bits).
struct Keys {
  uint32_t p = 0, m = 0;
};

// ---------------------------------------------------------------------------------------------- kernels
// Calls one(i, lane, jg) for i in [i0, n) with lane = i % 16 and jg = (base + i) * kGolden mod 2^32 (from the
// element's flat index, for the random bits): the scalar loop, for the fp16 types and for the tails of the
// vector loops (i0 = where they stopped, a multiple of 16). Groups of 16 with an int lane loop and 32-bit
// values, so that GCC can still vectorize what it can of the fp16 bodies.
template <class F>
inline void for_lanes(int64_t i0, int64_t n, int64_t base, F&& one) {
  int64_t i = i0;
  for (; i + kLanes <= n; i += kLanes) {
    const uint32_t jg0 = static_cast<uint32_t>(base + i) * kGolden;
    for (int l = 0; l < kLanes; ++l) one(i + l, l, jg0 + static_cast<uint32_t>(l) * kGolden);
  }
  for (; i < n; ++i) one(i, static_cast<int>(i % kLanes), static_cast<uint32_t>(base + i) * kGolden);
}

// The hash inputs key + jg of the 16 elements from flat index `base` (jg: see for_lanes): key + that of the
// first plus l * kGolden in lane l. The next 16 elements' are these + kGolden16 (mod 2^32, like jg).
constexpr uint32_t kGolden16 = 16u * kGolden;
inline VU lane_hash_inputs(uint32_t key, int64_t base) {
  const VU step = {0u,          kGolden,      2u * kGolden,  3u * kGolden,  4u * kGolden,  5u * kGolden,
                   6u * kGolden, 7u * kGolden,  8u * kGolden,  9u * kGolden,  10u * kGolden, 11u * kGolden,
                   12u * kGolden, 13u * kGolden, 14u * kGolden, 15u * kGolden};
  return step + (static_cast<uint32_t>(base) * kGolden + key);
}

inline float sign_of(float x) { return static_cast<float>((x > 0.f) - (x < 0.f)); }

// sign_of on 16 lanes: ±1.0f (1.0f's bits with x's sign bit) where x < 0 or x > 0, else +0.0f (zeros, NaN)
inline VF sign_v(VF x) {
#if defined(__AVX512F__)
  // one compare into a mask and one zero-masked ternary logic op: (x & sign bit) | 1.0f (imm 0xEA = A&B | C)
  const __mmask16 nonzero = _mm512_cmp_ps_mask(bitcast<__m512>(x), _mm512_setzero_ps(), _CMP_NEQ_OQ);
  return bitcast<VF>(_mm512_maskz_ternarylogic_epi32(nonzero, bitcast<__m512i>(x), _mm512_set1_epi32(INT32_MIN),
                                                     _mm512_set1_epi32(0x3f800000), 0xEA));
#else
  const VF zero = {};
  return bitcast<VF>((x < zero) | (x > zero) ? (bitcast<VU>(x) & 0x80000000u) | 0x3f800000u : VU{});
#endif
}

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
  if constexpr (P::kSimd) {
    VF a = {};
    for (; i + kLanes <= n; i += kLanes) {
      if ((i & (2 * kLanes - 1)) == 0) ahead(x, i);
      const VF v = P::ldv(x + i);
      a += v * v;
    }
    storev(acc, a);
  }
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

// Sum of squares of a long run, in kBlock pieces added in order (identical to the per-item sums).
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
    uint32_t any = 0;
    int64_t i = b;
    if constexpr (P::kSimd) {
      VU acc = {};
      for (; i + P::kScan <= e; i += P::kScan) acc = P::exp_max(acc, g + i);
      any = P::exp_all_ones(acc);
    } else {
      uint32_t acc[kLanes] = {0};
      for (; i + kLanes <= e; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) acc[l] |= static_cast<uint32_t>(P::nonfinite(g[i + l]));
      }
      for (int l = 0; l < kLanes; ++l) any |= acc[l];
    }
    for (; i < e; ++i) any |= static_cast<uint32_t>(P::nonfinite(g[i]));
    if (any) return true;
  }
  return false;
}

// Phase A of a tensor whose RMS is recomputed: finiteness of g and sum of squares of theta in one pass (the sum
// uses the lane pattern of sumsq(), so it is bit-identical to it).
template <class P>
double scan_g_theta(const typename P::S* __restrict g, const typename P::S* __restrict th, int64_t n,
                    bool& nonfinite) {
  float acc[kLanes] = {0.f};
  uint32_t bad = 0;
  int64_t i = 0;
  if constexpr (P::kSimd) {
    VF a = {};
    VI b = {};
    for (; i + kLanes <= n; i += kLanes) {
      if ((i & (2 * kLanes - 1)) == 0) {
        ahead(th, i);
        ahead(g, i);
      }
      const VF v = P::ldv(th + i);
      a += v * v;
      b |= P::nonfinite_v(g + i);
    }
    storev(acc, a);
    for (int l = 0; l < kLanes; ++l) bad |= static_cast<uint32_t>(b[l]);
  }
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = P::ld(th[i + l]);
      acc[l] += v * v;
      bad |= static_cast<uint32_t>(P::nonfinite(g[i + l]));
    }
  }
  for (; i < n; ++i) {
    const float v = P::ld(th[i]);
    acc[i % kLanes] += v * v;
    bad |= static_cast<uint32_t>(P::nonfinite(g[i]));
  }
  nonfinite = bad != 0;
  return combine(acc);
}

// Tiger, final micro-step, one eta for the whole range:
//   m <- b1*m + b2*g;  theta <- theta*(1 - eta*wd) - eta*sign(m)   (= theta - eta*(sign(m) + wd*theta))
// When WantSS, adds the squares of the stored new theta to the 16 lanes `acc` (lane = index % 16 from x[0] of
// the item: callers keep `acc` across the pieces of one item, so the sum matches sumsq() bit for bit).
// `base`: flat index of element 0 in its tensor (the random bits of stochastic rounding depend on it).
template <class P, class M, bool WantSS>
void tiger_update_run(typename P::S* __restrict th, const typename P::S* __restrict g, typename M::S* __restrict m,
                      int64_t n, float b1, float b2, float eta, float decay, float* __restrict acc_io, Keys k,
                      int64_t base) {
  float acc[kLanes];  // a local copy keeps the lanes in registers; same accumulation order as one long pass
  std::memcpy(acc, acc_io, sizeof(acc));
  const uint32_t kp = k.p, km = k.m;  // locals, not members of a by-reference capture: keeps it vectorizable
  int64_t i0 = 0;
  if constexpr (kSimdPair<P, M>) {
    static_assert(!M::kSR || M::kLow, "a vector momentum's stochastic rounding reads theta's hash");
    VF a = loadv<VF>(acc);
    VU hp = lane_hash_inputs(kp, base);
    VU tb[2], mb[2];  // rounded theta and m of a pair of vectors
    i0 = vec_loop(
        n,
        [&](int64_t i, int k) {
          const VU mix = mix_if<kVecSR<P, M>>(hp);  // one hash for theta and m
          const VF mn = b1 * M::ldv(m + i) + b2 * P::ldv(g + i);
          const VF s = sign_v(M::roundv(mn, mix, mb[k]));  // sign of the momentum as stored
          const VF v = P::roundv(P::ldv(th + i) * decay - eta * s, mix, tb[k]);
          if (WantSS) a += v * v;
          hp += kGolden16;
        },
        [&](int64_t i, int pair) {
          if (pair == 2) {
            ahead(th, i);
            ahead(g, i);
            ahead(m, i);
            M::stv2(m + i, mb[0], mb[1]);
            P::stv2(th + i, tb[0], tb[1]);
          } else {
            M::stv(m + i, mb[0]);
            P::stv(th + i, tb[0]);
          }
        });
    storev(acc, a);
  }
  for_lanes(i0, n, base, [&](int64_t i, int lane, uint32_t jg) {
    uint32_t bp, bm;
    draw<P, M>(kp, km, jg, bp, bm);
    const float mn = b1 * M::ld(m[i]) + b2 * P::ld(g[i]);
    const typename M::S ms = M::put(mn, bm);
    m[i] = ms;
    const float s = sign_of(M::ld(ms));  // sign of the momentum as stored (identical to mn for fp32 momentum)
    const typename P::S ts = P::put(P::ld(th[i]) * decay - eta * s, bp);
    th[i] = ts;
    if (WantSS) {
      const float v = P::ld(ts);
      acc[lane] += v * v;
    }
  });
  if (WantSS) std::memcpy(acc_io, acc, sizeof(acc));
}

// Non-final micro-step: m <- b1*m + b2*g (theta untouched: 12 bytes per fp32 parameter).
template <class P, class M>
void tiger_fold_run(const typename P::S* __restrict g, typename M::S* __restrict m, int64_t n, float b1, float b2,
                    Keys k, int64_t base) {
  const uint32_t km = k.m;  // locals, not members of a by-reference capture: keeps the loop vectorizable
  int64_t i0 = 0;
  if constexpr (kSimdPair<P, M>) {
    VU hm = lane_hash_inputs(km, base);
    VU mb[2];
    i0 = vec_loop(
        n,
        [&](int64_t i, int k) {
          M::roundv(b1 * M::ldv(m + i) + b2 * P::ldv(g + i), mix_if<M::kSR>(hm), mb[k]);
          hm += kGolden16;
        },
        [&](int64_t i, int pair) {
          if (pair == 2) {
            ahead(g, i);
            ahead(m, i);
            M::stv2(m + i, mb[0], mb[1]);
          } else {
            M::stv(m + i, mb[0]);
          }
        });
  }
  for_lanes(i0, n, base,
            [&](int64_t i, int, uint32_t jg) {
              m[i] = M::put(b1 * M::ld(m[i]) + b2 * P::ld(g[i]), M::kSR ? sr_bits(km, jg) : 0u);
            });
}

// The optimistic path checks g piece by piece (kCheckPiece elements: 2 KiB of fp32, still in L1 when the update
// reads it) and stops before the first piece holding a non-finite value. Returns the number of elements
// written (n when g is finite); the sum of squares of the new theta goes to *ss when WantSS and all of it was
// written. Checked = false: no test (two-phase path, g known finite).
constexpr int64_t kCheckPiece = 512;

template <class P, class M, bool WantSS, bool Checked>
int64_t tiger_update(typename P::S* __restrict th, const typename P::S* __restrict g, typename M::S* __restrict m,
                     int64_t n, float b1, float b2, float eta, float decay, double* ss, Keys k, int64_t base) {
  float acc[kLanes] = {0.f};
  if (Checked) {
    for (int64_t b = 0; b < n; b += kCheckPiece) {
      const int64_t len = std::min(kCheckPiece, n - b);
      if (any_nonfinite<P>(g + b, len)) return b;
      tiger_update_run<P, M, WantSS>(th + b, g + b, m + b, len, b1, b2, eta, decay, acc, k, base + b);
    }
  } else {
    tiger_update_run<P, M, WantSS>(th, g, m, n, b1, b2, eta, decay, acc, k, base);
  }
  if (WantSS) *ss = combine(acc);
  return n;
}

template <class P, class M, bool Checked>
int64_t tiger_fold(const typename P::S* __restrict g, typename M::S* __restrict m, int64_t n, float b1, float b2,
                   Keys k, int64_t base) {
  if (!Checked) {
    tiger_fold_run<P, M>(g, m, n, b1, b2, k, base);
    return n;
  }
  for (int64_t b = 0; b < n; b += kCheckPiece) {
    const int64_t len = std::min(kCheckPiece, n - b);
    if (any_nonfinite<P>(g + b, len)) return b;
    tiger_fold_run<P, M>(g + b, m + b, len, b1, b2, k, base + b);
  }
  return n;
}

// Rollback of an optimistic pass over n elements of a tensor found non-finite, of which the first `written` were
// updated: those are restored by inverting the update, m = (m' - b2*g)/b1 and, when `update`,
// theta = (theta' + eta*sign(m'))/decay (theta' kept when decay == 0: the update forgot theta). With
// `round_trip_rest`, the others get the same forward-then-inverse round trip in registers where g is finite
// (nothing where it is not): the result is then a function of each element alone, whatever the threads had
// written when the non-finite value was found, i.e. reproducible (used for tensors of several blocks; a
// one-block tensor is processed by one thread in order, so its written prefix is already deterministic and
// the rest stays exact). Restored values equal the old ones to within float rounding, not bit for bit.
// Stochastic rounding: the forward of the round trip draws the bits the pass drew (they depend on the index
// only); the inverse rounds to nearest. The forward's error is then below one ulp of the stored value instead
// of half a one, so the restored m and theta are within about one ulp (m: 1/b1 ulp) of the old ones.
template <class P, class M>
void tiger_rollback(typename P::S* __restrict th, const typename P::S* __restrict g, typename M::S* __restrict m,
                    int64_t n, int64_t written, bool round_trip_rest, float b1, float b2, bool update, float eta,
                    float decay, Keys k, int64_t base) {
  const int64_t end = round_trip_rest ? n : written;
  for (int64_t i = 0; i < end; ++i) {
    const float gi = P::ld(g[i]);
    typename M::S ms;
    typename P::S ts = th[i];
    if (i < written) {
      ms = m[i];
    } else {
      if (P::nonfinite(g[i])) continue;
      const uint32_t jg = static_cast<uint32_t>(base + i) * kGolden;
      uint32_t bp, bm;
      draw<P, M>(k.p, k.m, jg, bp, bm);
      ms = M::put(b1 * M::ld(m[i]) + b2 * gi, bm);
      if (update) ts = P::put(P::ld(th[i]) * decay - eta * sign_of(M::ld(ms)), bp);
    }
    const float mn = M::ld(ms);
    if (update && decay != 0.f) th[i] = P::st((P::ld(ts) + eta * sign_of(mn)) / decay);
    m[i] = M::st((mn - b2 * gi) / b1);
  }
}

// Non-finite rule: theta <- (theta - c)*s + c. Returns the sum of squares of the new theta when WantSS.
// Stochastic rounding of theta uses the key of the call, like the update it replaces.
template <class P, bool WantSS>
double tiger_shrink(typename P::S* __restrict th, int64_t n, float c, float s, uint32_t key, int64_t base) {
  float acc[kLanes] = {0.f};
  int64_t i0 = 0;
  if constexpr (P::kSimd) {
    VF a = {};
    VU hp = lane_hash_inputs(key, base);
    VU tb[2];
    i0 = vec_loop(
        n,
        [&](int64_t i, int k) {
          const VF v = P::roundv((P::ldv(th + i) - c) * s + c, mix_if<P::kSR>(hp), tb[k]);
          if (WantSS) a += v * v;
          hp += kGolden16;
        },
        [&](int64_t i, int pair) {
          if (pair == 2) {
            P::stv2(th + i, tb[0], tb[1]);
          } else {
            P::stv(th + i, tb[0]);
          }
        });
    storev(acc, a);
  }
  for_lanes(i0, n, base, [&](int64_t i, int lane, uint32_t jg) {
    const typename P::S ts = P::put((P::ld(th[i]) - c) * s + c, P::kSR ? sr_bits(key, jg) : 0u);
    th[i] = ts;
    if (WantSS) {
      const float v = P::ld(ts);
      acc[lane] += v * v;
    }
  });
  return WantSS ? combine(acc) : 0.0;
}

// Lion (paper order): c = b1*m + (1-b1)*g; theta <- theta*(1 - lr*wd) - lr*sign(c); m <- b2*m + (1-b2)*g.
template <class P, class M>
void lion_update(typename P::S* __restrict th, const typename P::S* __restrict g, typename M::S* __restrict m,
                 int64_t n, float b1, float c1, float b2, float c2, float lr, float decay, Keys k, int64_t base) {
  const uint32_t kp = k.p, km = k.m;
  int64_t i0 = 0;
  if constexpr (kSimdPair<P, M>) {
    static_assert(!M::kSR || M::kLow, "a vector momentum's stochastic rounding reads theta's hash");
    VU hp = lane_hash_inputs(kp, base);
    VU tb[2], mb[2];
    i0 = vec_loop(
        n,
        [&](int64_t i, int k) {
          const VU mix = mix_if<kVecSR<P, M>>(hp);  // one hash for theta and m
          const VF mo = M::ldv(m + i);
          const VF gi = P::ldv(g + i);
          const VF c = b1 * mo + c1 * gi;
          P::roundv(P::ldv(th + i) * decay - lr * sign_v(c), mix, tb[k]);
          M::roundv(b2 * mo + c2 * gi, mix, mb[k]);
          hp += kGolden16;
        },
        [&](int64_t i, int pair) {
          if (pair == 2) {
            ahead(th, i);
            ahead(g, i);
            ahead(m, i);
            P::stv2(th + i, tb[0], tb[1]);
            M::stv2(m + i, mb[0], mb[1]);
          } else {
            P::stv(th + i, tb[0]);
            M::stv(m + i, mb[0]);
          }
        });
  }
  for_lanes(i0, n, base, [&](int64_t i, int, uint32_t jg) {
    const float mo = M::ld(m[i]);
    const float gi = P::ld(g[i]);
    const float c = b1 * mo + c1 * gi;
    uint32_t bp, bm;
    draw<P, M>(kp, km, jg, bp, bm);
    th[i] = P::put(P::ld(th[i]) * decay - lr * sign_of(c), bp);
    m[i] = M::put(b2 * mo + c2 * gi, bm);
  });
}

// Fingerprint of a tensor's bytes at 8 evenly spaced runs of 16 elements (FNV-1a over the raw bytes, numel
// mixed in): cheap (8 cache lines), used by the caller to detect writes to theta that bypass its version
// counter before trusting a cached sum of squares. Never 0 (0 means "none").
uint64_t fingerprint(const at::Tensor& t) {
  const int64_t n = t.numel();
  const int64_t es = static_cast<int64_t>(t.element_size());
  const auto* base = static_cast<const unsigned char*>(t.data_ptr());
  uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(n);
  for (int k = 0; k < 8; ++k) {
    const int64_t start = std::min<int64_t>(n, k * (n / 8));
    const int64_t len = std::min<int64_t>(kLanes, n - start);
    const unsigned char* p = base + start * es;
    for (int64_t b = 0; b < len * es; ++b) {
      h ^= p[b];
      h *= 1099511628211ull;
    }
  }
  return h == 0 ? 1 : h;
}

// ---------------------------------------------------------------------------------------------- dispatch
enum class Kind : int { F32F32 = 0, F32BF16, F32F16, BF16F32, BF16BF16, F16F32, F16F16 };

Kind kind_of(const at::Tensor& p, const at::Tensor& m, int64_t i) {
  const auto pd = p.scalar_type(), md = m.scalar_type();
  if (pd == at::kFloat && md == at::kFloat) return Kind::F32F32;
  if (pd == at::kFloat && md == at::kBFloat16) return Kind::F32BF16;
  if (pd == at::kFloat && md == at::kHalf) return Kind::F32F16;
  if (pd == at::kBFloat16 && md == at::kFloat) return Kind::BF16F32;
  if (pd == at::kBFloat16 && md == at::kBFloat16) return Kind::BF16BF16;
  if (pd == at::kHalf && md == at::kFloat) return Kind::F16F32;
  if (pd == at::kHalf && md == at::kHalf) return Kind::F16F16;
  TORCH_CHECK_TYPE(false, "fused Tiger/Lion: tensor ", i, " has param dtype ", pd, " and momentum dtype ", md,
                   "; supported: param in {float32, bfloat16, float16}, momentum float32 or the param dtype, "
                   "or float32 params with bfloat16/float16 momentum");
  return Kind::F32F32;  // unreachable
}

// Calls f.template operator()<P, M>() for the tensor's (param, momentum) storage types and roundings: sr_p =
// stochastic rounding of a low-precision theta, sr_m = of a low-precision momentum (ignored for float32).
template <class F>
decltype(auto) dispatch(Kind k, bool sr_p, bool sr_m, F&& f) {
  using P32 = Sto<F32, false>;
  switch (k) {
    case Kind::F32F32: return f.template operator()<P32, P32>();
    case Kind::F32BF16:
      if (sr_m) return f.template operator()<P32, Sto<BF16, true, true>>();
      return f.template operator()<P32, Sto<BF16, false>>();
    case Kind::F32F16:
      if (sr_m) return f.template operator()<P32, Sto<F16, true>>();
      return f.template operator()<P32, Sto<F16, false>>();
    case Kind::BF16F32:
      if (sr_p) return f.template operator()<Sto<BF16, true>, P32>();
      return f.template operator()<Sto<BF16, false>, P32>();
    case Kind::BF16BF16:
      if (sr_p && sr_m) return f.template operator()<Sto<BF16, true>, Sto<BF16, true, true>>();
      if (sr_p) return f.template operator()<Sto<BF16, true>, Sto<BF16, false>>();
      return f.template operator()<Sto<BF16, false>, Sto<BF16, false>>();  // (sr_m without sr_p: not offered)
    case Kind::F16F32:
      if (sr_p) return f.template operator()<Sto<F16, true>, P32>();
      return f.template operator()<Sto<F16, false>, P32>();
    default:
      if (sr_p && sr_m) return f.template operator()<Sto<F16, true>, Sto<F16, true>>();
      if (sr_p) return f.template operator()<Sto<F16, true>, Sto<F16, false>>();
      return f.template operator()<Sto<F16, false>, Sto<F16, false>>();
  }
}

// Per-tensor stochastic-rounding settings of a call: sr_keys empty = round to nearest everywhere.
struct SRPlan {
  std::vector<Keys> keys;
  std::vector<uint8_t> sr_p, sr_m;
};

SRPlan sr_plan(const std::vector<Kind>& kinds, at::IntArrayRef sr_keys, bool momentum_sr) {
  const auto n = kinds.size();
  TORCH_CHECK_VALUE(sr_keys.empty() || sr_keys.size() == n, "fused Tiger/Lion: sr_keys must be empty or have one ",
                    "entry per tensor (", n, "), got ", sr_keys.size());
  SRPlan plan{std::vector<Keys>(n), std::vector<uint8_t>(n, 0), std::vector<uint8_t>(n, 0)};
  if (sr_keys.empty()) return plan;
  for (size_t i = 0; i < n; ++i) {
    const int64_t key = sr_keys[i];
    TORCH_CHECK_VALUE(key >= 0 && key <= 0xFFFFFFFFll, "fused Tiger/Lion: sr_keys[", i, "] must be in [0, 2**32), got ",
                      key);
    plan.keys[i].p = static_cast<uint32_t>(key);
    const Kind k = kinds[i];
    // a bf16 momentum reads the low half of theta's bits (same key), an fp16 one hashes with the salted key
    const bool m_bf16 = k == Kind::F32BF16 || k == Kind::BF16BF16;
    plan.keys[i].m = m_bf16 ? static_cast<uint32_t>(key) : static_cast<uint32_t>(key) ^ kMomentumSalt;
    plan.sr_p[i] = k != Kind::F32F32 && k != Kind::F32BF16 && k != Kind::F32F16;
    plan.sr_m[i] = momentum_sr && (k == Kind::F32BF16 || k == Kind::F32F16 || k == Kind::BF16BF16 ||
                                   k == Kind::F16F16);
  }
  return plan;
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

// ---------------------------------------------------------------------------------------------- scheduling
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// Waits for a condition that another *running* worker is about to make true (it holds the last claimed item).
template <class Pred>
void spin_until(Pred&& done) {
  for (int k = 0; !done(); ++k) {
    if (k < 4096) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

int64_t num_workers(int64_t elems) {
  int64_t nthr = at::in_parallel_region() ? 1 : static_cast<int64_t>(at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(nthr, elems / (kBlock / 2)));
}

// Work-stealing split of the items [0, n) among nthr workers: each starts on its own contiguous range, front to
// back (long sequential streams keep the hardware prefetchers busy), and a worker that runs dry takes items
// from the back of another worker's range. Range = (begin << 32) | end, updated by CAS.
class RangeQueue {
 public:
  RangeQueue(int64_t lo, int64_t hi, int64_t nthr) : ranges_(static_cast<size_t>(nthr)) {
    const int64_t n = hi - lo;
    for (int64_t t = 0; t < nthr; ++t) {
      const auto b = static_cast<uint64_t>(lo + n * t / nthr), e = static_cast<uint64_t>(lo + n * (t + 1) / nthr);
      ranges_[t].store((b << 32) | e, std::memory_order_relaxed);
    }
  }
  // The next item for worker t, or -1 once every item is taken.
  int64_t next(int64_t t) {
    const auto nthr = static_cast<int64_t>(ranges_.size());
    for (int64_t u = 0; u < nthr; ++u) {
      const int64_t item = take((t + u) % nthr, u == 0);
      if (item >= 0) return item;
    }
    return -1;
  }

 private:
  int64_t take(int64_t t, bool front) {
    auto& r = ranges_[t];
    uint64_t cur = r.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t b = cur >> 32, e = cur & 0xffffffffull;
      if (b >= e) return -1;
      const uint64_t nxt = front ? (((b + 1) << 32) | e) : ((b << 32) | (e - 1));
      if (r.compare_exchange_weak(cur, nxt, std::memory_order_relaxed)) return static_cast<int64_t>(front ? b : e - 1);
    }
  }
  std::vector<std::atomic<uint64_t>> ranges_;
};

// Runs worker(t) for t in [0, nthr) on the intra-op pool (inline when nthr == 1). Workers claim work with
// atomics, so a pool that grants fewer threads than asked still completes all of it.
template <class W>
void run_workers(int64_t nthr, W&& worker) {
  if (nthr <= 1) {
    worker(0);
    return;
  }
  at::parallel_for(0, nthr, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) worker(t);
  });
}

// ---------------------------------------------------------------------------------------------- Tiger
// flags (uint8 [n], out): per-tensor nonfinite flags.
// sumsq (float64 [n], in/out): in: a cached sum(theta^2) for lr_mode 1 tensors, NaN = recompute;
//   out (when want_sumsq): sum(theta^2) of the theta left by this call for lr_mode 1 tensors, NaN if unknown.
// fprints (int64 [n], in/out): in: the fingerprint returned with each cached sum (a mismatch drops the sum);
//   out: the fingerprint of the theta left by this call where sumsq is returned, else 0.
void tiger_step(at::TensorList params, at::TensorList grads, at::TensorList moms, at::IntArrayRef lr_modes,
                at::ArrayRef<double> lrs, at::ArrayRef<double> wds, at::ArrayRef<double> centers,
                at::ArrayRef<double> floors, double b1d, double b2d, bool update, double shrink, bool exact,
                const at::Tensor& flags_t, const at::Tensor& sumsq_t, const at::Tensor& fprints_t, bool want_sumsq,
                int64_t group_bytes, at::IntArrayRef sr_keys, bool momentum_sr) {
  std::vector<Kind> kinds;
  check_lists(params, grads, moms, kinds);
  const SRPlan sr = sr_plan(kinds, sr_keys, momentum_sr);
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(lr_modes.size()) == n && static_cast<int64_t>(lrs.size()) == n &&
                        static_cast<int64_t>(wds.size()) == n && static_cast<int64_t>(centers.size()) == n &&
                        static_cast<int64_t>(floors.size()) == n,
                    "fused Tiger: lr_modes, lrs, weight_decays, centers and rms_floor need one entry per tensor");
  TORCH_CHECK_VALUE(flags_t.scalar_type() == at::kByte && flags_t.numel() == n && flags_t.is_contiguous(),
                    "fused Tiger: flags must be a contiguous uint8 tensor with one entry per tensor");
  TORCH_CHECK_VALUE(sumsq_t.scalar_type() == at::kDouble && sumsq_t.numel() == n && sumsq_t.is_contiguous(),
                    "fused Tiger: sumsq must be a contiguous float64 tensor with one entry per tensor");
  TORCH_CHECK_VALUE(fprints_t.scalar_type() == at::kLong && fprints_t.numel() == n && fprints_t.is_contiguous(),
                    "fused Tiger: fprints must be a contiguous int64 tensor with one entry per tensor");
  uint8_t* flags = flags_t.data_ptr<uint8_t>();
  double* ss = sumsq_t.data_ptr<double>();
  int64_t* fps = fprints_t.data_ptr<int64_t>();

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
        cols[i] = p.size(0) > 0 ? std::max<int64_t>(1, p.numel() / p.size(0)) : 1;  // [k, 0]: no rows to update
      }
    }
  }

  const float b1 = static_cast<float>(b1d), b2 = static_cast<float>(b2d), s = static_cast<float>(shrink);
  std::vector<std::atomic<uint8_t>> bad(n);
  for (int64_t i = 0; i < n; ++i) bad[i].store(0, std::memory_order_relaxed);
  std::vector<double> rms_sum(n, std::nan(""));  // sum(theta^2) before the update (mode 1)
  std::vector<uint8_t> need_rms(n, 0), two_phase(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (mode[i] == 1 && update) {
      // a cached sum is trusted only if theta still has the fingerprint it had when the sum was taken
      if (!std::isnan(ss[i]) && static_cast<uint64_t>(fps[i]) == fingerprint(params[i])) {
        rms_sum[i] = ss[i];
      } else {
        need_rms[i] = 1;
      }
    }
    // Inverting m' = b1*m + b2*g divides rounding errors by b1: with b1 < 0.5 (beta < 0.5; beta = 0 forgets m
    // entirely) the rollback would not be accurate, so such steps take the exact two-phase path, and so do
    // tensors whose RMS needs a read of theta anyway.
    two_phase[i] = exact || b1 < 0.5f || need_rms[i];
  }

  // ---- work items of every tensor: blocks of kBlock elements (whole rows for per-row tensors)
  std::vector<Item> items;
  std::vector<int64_t> first_item(n + 1, 0);
  std::vector<int64_t> row_off(n + 1, 0);  // per-row eta of optimistic per-row tensors (for a rollback)
  int64_t total_elems = 0;
  for (int64_t i = 0; i < n; ++i) {
    first_item[i] = static_cast<int64_t>(items.size());
    const int64_t numel = params[i].numel();
    total_elems += numel;
    int64_t step = kBlock;
    const bool rows = mode[i] == 2 && update;
    if (rows) step = std::max<int64_t>(1, kBlock / cols[i]) * cols[i];
    for (int64_t b = 0; b < numel; b += step) items.push_back({i, b, std::min(numel, b + step)});
    row_off[i + 1] = row_off[i] + (rows && !two_phase[i] ? numel / cols[i] : 0);
  }
  first_item[n] = static_cast<int64_t>(items.size());
  const int64_t nitems = first_item[n];
  const int64_t nthr = num_workers(total_elems);
  std::vector<float> row_eta(static_cast<size_t>(row_off[n]), std::nanf(""));

  // Two-phase tensors: a "big" one (phase-A bytes over the budget) is shared by all threads, phase B once all
  // of its phase A is done; a "small" one is handled whole by one thread, A then B back to back (the data is
  // still in that core's caches). Small tensors are handed out largest first (LPT order balances threads).
  std::vector<int64_t> small, big, opt_items;
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    if (p.numel() == 0) continue;
    if (!two_phase[i]) {
      for (int64_t j = first_item[i]; j < first_item[i + 1]; ++j) opt_items.push_back(j);
      continue;
    }
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size()) * (need_rms[i] ? 2 : 1);
    (nthr > 1 && bytes > group_bytes ? big : small).push_back(i);
  }
  std::stable_sort(small.begin(), small.end(),
                   [&](int64_t a, int64_t b) { return params[a].numel() > params[b].numel(); });
  const int64_t nbig = static_cast<int64_t>(big.size());
  const int64_t nopt = static_cast<int64_t>(opt_items.size());

  std::vector<double> partial(nitems, 0.0);   // per item: sum of squares of theta (phase A)
  std::vector<double> partial2(nitems, 0.0);  // per item: sum of squares of the new theta
  std::vector<int64_t> written(nitems, 0);    // per optimistic item: elements written before a non-finite group
  std::vector<float> eta(n, 0.f), decay(n, 1.f);

  // eta and decay of a tensor once its RMS is known (mode 1); per-row tensors get theirs row by row
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
  for (int64_t i = 0; i < n; ++i) {
    if (!two_phase[i]) finish_a(i);
  }
  auto row_eta_of = [&](int64_t i, float rms) {
    return static_cast<float>(lrs[i]) * std::max(rms, static_cast<float>(floors[i]));
  };

  // two-phase path, phase A of one item: finiteness of g, and sum(theta^2) where the RMS must be recomputed
  auto phase_a = [&](int64_t j) {
    const Item& it = items[j];
    const int64_t i = it.tensor, len = it.end - it.begin;
    if (bad[i].load(std::memory_order_relaxed)) return;  // theta will only shrink: nothing else to learn
    dispatch(kinds[i], false, false, [&]<class P, class M>() {
      const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
      if (need_rms[i]) {
        const auto* th = static_cast<const typename P::S*>(params[i].data_ptr()) + it.begin;
        bool nf = false;
        partial[j] = scan_g_theta<P>(g, th, len, nf);
        if (nf) bad[i].store(1, std::memory_order_relaxed);
      } else if (any_nonfinite<P>(g, len)) {
        bad[i].store(1, std::memory_order_relaxed);
      }
    });
  };
  // the update of one item; Checked: the optimistic path (stops at a non-finite group, records what it wrote)
  auto update_item = [&]<bool Checked>(int64_t j) {
    const Item& it = items[j];
    const int64_t i = it.tensor, len = it.end - it.begin;
    const bool want = want_sumsq && mode[i] == 1;
    const Keys k = sr.keys[i];
    dispatch(kinds[i], sr.sr_p[i], sr.sr_m[i], [&]<class P, class M>() {
      auto* th = static_cast<typename P::S*>(params[i].data_ptr()) + it.begin;
      const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
      auto* m = static_cast<typename M::S*>(moms[i].data_ptr()) + it.begin;
      int64_t w = len;
      if (!update) {
        w = tiger_fold<P, M, Checked>(g, m, len, b1, b2, k, it.begin);
      } else if (mode[i] == 2) {
        const int64_t c = cols[i];
        const float wd = static_cast<float>(wds[i]);
        for (int64_t r = 0; r < len; r += c) {
          const double rms = std::sqrt(sumsq_blocks<P>(th + r, c) / static_cast<double>(c));
          const float e = row_eta_of(i, static_cast<float>(rms));
          if (Checked) row_eta[row_off[i] + (it.begin + r) / c] = e;
          const int64_t wr = tiger_update<P, M, false, Checked>(th + r, g + r, m + r, c, b1, b2, e, 1.f - e * wd,
                                                               nullptr, k, it.begin + r);
          if (Checked && wr < c) {
            w = r + wr;
            break;
          }
        }
      } else if (want) {
        w = tiger_update<P, M, true, Checked>(th, g, m, len, b1, b2, eta[i], decay[i], &partial2[j], k, it.begin);
      } else {
        w = tiger_update<P, M, false, Checked>(th, g, m, len, b1, b2, eta[i], decay[i], nullptr, k, it.begin);
      }
      if (Checked) {
        written[j] = w;
        if (w < len) bad[i].store(1, std::memory_order_relaxed);
      }
    });
  };
  // shrink of one item (non-finite tensor); optimistic items first undo what they wrote
  auto shrink_item = [&](int64_t j, bool rollback) {
    const Item& it = items[j];
    const int64_t i = it.tensor, len = it.end - it.begin;
    const bool want = want_sumsq && mode[i] == 1;
    const Keys k = sr.keys[i];
    dispatch(kinds[i], sr.sr_p[i], sr.sr_m[i], [&]<class P, class M>() {
      auto* th = static_cast<typename P::S*>(params[i].data_ptr()) + it.begin;
      if (rollback) {
        const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
        auto* m = static_cast<typename M::S*>(moms[i].data_ptr()) + it.begin;
        const bool rest = first_item[i + 1] - first_item[i] > 1;  // several blocks: which were written is timing
        if (update && mode[i] == 2) {
          const int64_t c = cols[i];
          const float wd = static_cast<float>(wds[i]);
          for (int64_t r = 0; r < len; r += c) {
            const int64_t w = std::clamp<int64_t>(written[j] - r, 0, c);
            if (w == 0 && !rest) break;
            float e = row_eta[row_off[i] + (it.begin + r) / c];
            if (std::isnan(e)) {  // a row the pass never reached: its eta from its (untouched) theta
              const double rms = std::sqrt(sumsq_blocks<P>(th + r, c) / static_cast<double>(c));
              e = row_eta_of(i, static_cast<float>(rms));
            }
            tiger_rollback<P, M>(th + r, g + r, m + r, c, w, rest, b1, b2, true, e, 1.f - e * wd, k, it.begin + r);
          }
        } else {
          tiger_rollback<P, M>(th, g, m, len, written[j], rest, b1, b2, update, eta[i], decay[i], k, it.begin);
        }
      }
      const float c = static_cast<float>(centers[i]);
      partial2[j] = want ? tiger_shrink<P, true>(th, len, c, s, k.p, it.begin)
                         : tiger_shrink<P, false>(th, len, c, s, k.p, it.begin);
    });
  };
  // two-phase path, phase B of one item
  auto phase_b = [&](int64_t j) {
    if (bad[items[j].tensor].load(std::memory_order_relaxed)) {
      shrink_item(j, false);
    } else {
      update_item.template operator()<false>(j);
    }
  };

  // ---- one parallel region: small two-phase tensors, big two-phase tensors, then the optimistic items
  std::atomic<int64_t> next_small{0};
  RangeQueue opt_queue(0, nopt, nthr);
  std::vector<std::unique_ptr<RangeQueue>> a_queue;
  std::vector<std::atomic<int64_t>> a_done(nbig);
  std::vector<std::atomic<int>> ready(nbig);
  for (int64_t b = 0; b < nbig; ++b) {
    a_queue.push_back(std::make_unique<RangeQueue>(first_item[big[b]], first_item[big[b] + 1], nthr));
    a_done[b].store(0, std::memory_order_relaxed);
    ready[b].store(0, std::memory_order_relaxed);
  }
  std::vector<std::atomic<uint8_t>> b_claimed(nbig > 0 ? nitems : 0);
  for (auto& c : b_claimed) c.store(0, std::memory_order_relaxed);
  // own[t * nbig + b]: the phase-A items of big tensor b that worker t read, in order. Its phase B first walks
  // them backwards (what it read last is most likely still cached), then finishes those of slower workers.
  std::vector<std::vector<int64_t>> own(static_cast<size_t>(nthr * nbig));

  auto worker = [&](int64_t t) {
    for (int64_t k; (k = next_small.fetch_add(1, std::memory_order_relaxed)) < static_cast<int64_t>(small.size());) {
      const int64_t i = small[k];
      for (int64_t j = first_item[i]; j < first_item[i + 1]; ++j) phase_a(j);
      finish_a(i);
      for (int64_t j = first_item[i + 1] - 1; j >= first_item[i]; --j) phase_b(j);
    }
    for (int64_t b = 0; b < nbig; ++b) {
      const int64_t i = big[b], lo = first_item[i], hi = first_item[i + 1];
      auto& mine = own[t * nbig + b];
      for (int64_t j; (j = a_queue[b]->next(t)) >= 0;) {
        phase_a(j);
        mine.push_back(j);
        if (a_done[b].fetch_add(1, std::memory_order_acq_rel) == hi - lo - 1) {  // completed phase A
          finish_a(i);
          ready[b].store(1, std::memory_order_release);
        }
      }
      spin_until([&] { return ready[b].load(std::memory_order_acquire) != 0; });
      for (auto it = mine.rbegin(); it != mine.rend(); ++it) {
        if (!b_claimed[*it].exchange(1, std::memory_order_relaxed)) phase_b(*it);
      }
      for (int64_t u = 1; u < nthr; ++u) {
        for (const int64_t j : own[((t + u) % nthr) * nbig + b]) {
          if (!b_claimed[j].exchange(1, std::memory_order_relaxed)) phase_b(j);
        }
      }
    }
    for (int64_t k; (k = opt_queue.next(t)) >= 0;) {
      const int64_t j = opt_items[k];
      if (!bad[items[j].tensor].load(std::memory_order_relaxed)) update_item.template operator()<true>(j);
    }
  };
  run_workers(nthr, worker);

  // ---- optimistic tensors found non-finite: undo what was written, then shrink (rare: a second region)
  std::vector<int64_t> fix;
  for (const int64_t j : opt_items) {
    if (bad[items[j].tensor].load(std::memory_order_relaxed)) fix.push_back(j);
  }
  if (!fix.empty()) {
    std::atomic<int64_t> next_fix{0};
    const int64_t nfix = static_cast<int64_t>(fix.size());
    int64_t fix_elems = 0;
    for (const int64_t j : fix) fix_elems += items[j].end - items[j].begin;
    run_workers(num_workers(fix_elems), [&](int64_t) {
      for (int64_t k; (k = next_fix.fetch_add(1, std::memory_order_relaxed)) < nfix;) shrink_item(fix[k], true);
    });
  }

  // ---- outputs: flags, and the sum of squares of the new theta (in block order) with its fingerprint
  for (int64_t i = 0; i < n; ++i) {
    flags[i] = bad[i].load(std::memory_order_relaxed);
    double out = std::nan("");
    if (want_sumsq && mode[i] == 1) {
      if (flags[i] || update) {  // theta was rewritten here
        out = 0.0;
        for (int64_t j = first_item[i]; j < first_item[i + 1]; ++j) out += partial2[j];
      } else {
        out = ss[i];  // finite non-final micro-step: theta untouched, the cached value (or NaN) stays
      }
    }
    ss[i] = out;
    if (std::isnan(out)) {
      fps[i] = 0;
    } else if (flags[i] || update) {
      fps[i] = static_cast<int64_t>(fingerprint(params[i]));
    }
  }
  bump_versions(params);
  bump_versions(moms);
}

// ---------------------------------------------------------------------------------------------- Lion
void lion_step(at::TensorList params, at::TensorList grads, at::TensorList moms, double lr, double beta1,
               double beta2, double wd, at::IntArrayRef sr_keys, bool momentum_sr) {
  std::vector<Kind> kinds;
  check_lists(params, grads, moms, kinds);
  const SRPlan sr = sr_plan(kinds, sr_keys, momentum_sr);
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    total += numel;
    for (int64_t b = 0; b < numel; b += kBlock) items.push_back({i, b, std::min(numel, b + kBlock)});
  }
  const float b1 = static_cast<float>(beta1), c1 = static_cast<float>(1.0 - beta1);
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2);
  const float flr = static_cast<float>(lr), decay = static_cast<float>(1.0 - lr * wd);
  const int64_t nitems = static_cast<int64_t>(items.size());
  const int64_t nthr = num_workers(total);
  RangeQueue queue(0, nitems, nthr);
  run_workers(nthr, [&](int64_t t) {
    for (int64_t j; (j = queue.next(t)) >= 0;) {
      const Item& it = items[j];
      const int64_t i = it.tensor, len = it.end - it.begin;
      dispatch(kinds[i], sr.sr_p[i], sr.sr_m[i], [&]<class P, class M>() {
        auto* th = static_cast<typename P::S*>(params[i].data_ptr()) + it.begin;
        const auto* g = static_cast<const typename P::S*>(grads[i].data_ptr()) + it.begin;
        auto* m = static_cast<typename M::S*>(moms[i].data_ptr()) + it.begin;
        lion_update<P, M>(th, g, m, len, b1, c1, b2, c2, flr, decay, sr.keys[i], it.begin);
      });
    }
  });
  bump_versions(params);
  bump_versions(moms);
}

}  // namespace

TORCH_LIBRARY(lightning_tiger, m) {
  m.def(
      "tiger_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, int[] lr_modes, float[] lrs, "
      "float[] weight_decays, float[] centers, float[] rms_floor, float b1, float b2, bool update, "
      "float shrink_ratio, bool exact, Tensor(c!) flags, Tensor(d!) sumsq, Tensor(e!) fprints, bool want_sumsq, "
      "int group_bytes, int[] sr_keys, bool momentum_sr) -> ()");
  m.def(
      "lion_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] moms, float lr, float beta1, float beta2, "
      "float weight_decay, int[] sr_keys, bool momentum_sr) -> ()");
}

TORCH_LIBRARY_IMPL(lightning_tiger, CPU, m) {
  m.impl("tiger_step_", &tiger_step);
  m.impl("lion_step_", &lion_step);
}
