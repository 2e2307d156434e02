/*
 * Fused CPU loops for tritonmerge's task-arithmetic family (linear, task arithmetic, TIES,
 * magnitude, DARE), compiled on first use by tritonmerge/backends/cpu/kernels.py and called through
 * ctypes with raw pointers. Plain C11 + OpenMP; no torch or Python headers.
 *
 * The torch reference (tritonmerge/methods/task_arithmetic.py) is the specification. Every float
 * operation here is the one the reference performs, in the same order (experts accumulated
 * i = 0..N-1 in float32, scalars rounded to float32 first, true division), so results are
 * bit-identical to it. That requires compiling without -ffast-math and with -ffp-contract=off:
 * a fused multiply-add would round once where the reference rounds twice.
 *
 * Work is split into segments, contiguous runs of TM_CHUNK-element chunks, a few per thread; each
 * segment is processed in flat order, in blocks of TM_BLOCK elements converted to float32 in
 * per-thread scratch so that the arithmetic loops are simple and vectorise. Results never depend
 * on the thread count. Task vectors are never materialised in memory.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TM_ABI_VERSION 4
#define TM_MAX_EXPERTS 16
#define TM_BLOCK 1024
#define TM_CHUNK (64 * 1024)
#define TM_HIGH_BINS 32768 /* |x| has a zero sign bit: bits 30..16 */
#define TM_LOW_BINS 65536
/* Segments (the unit of parallel work) count histograms in uint32: at most 2^31 elements each. */
#define TM_SEGMENT_MAX ((int64_t)1 << 31)
/* At most this many segments: the low-bits histograms are kept per segment (N × 256 KiB each). */
#define TM_MAX_SEGMENTS 16

/* Hot loops get AVX2 and AVX-512 clones chosen at load time (the cached .so stays portable).
   -ffp-contract=off keeps every a*b + c rounded twice, as the torch reference rounds it; the one
   fused multiply-add (linear's) has clones of its own, since "avx2" alone lacks the instruction
   (the default clone calls libm's fmaf: slower, equally exact). GCC resolves "arch=" clones by
   exact CPU model, so only feature names are used. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(TM_NO_TARGET_CLONES)
#define TM_HOT __attribute__((target_clones("default", "avx2", "avx512f")))
#define TM_FMA_CLONES __attribute__((target_clones("default", "fma", "avx512f")))
#define TM_AVX512_SCAN 1
#include <immintrin.h>
#else
#define TM_HOT
#define TM_FMA_CLONES
#endif

/* The hot loops' helpers are inlined into every clone: GCC left load_block out of line, compiled
   once for the baseline ISA and called from the AVX-512 clones (task arithmetic's fused merge of
   the 150M shape: 87 -> 81 ms with it inlined). */
#if defined(__GNUC__)
#define TM_INLINE static inline __attribute__((always_inline))
#else
#define TM_INLINE static inline
#endif

enum { TM_F32 = 0, TM_BF16 = 1, TM_F16 = 2 };
enum {
    KEEP_ALL = 0,       /* no mask */
    KEEP_NONE = 1,      /* the task vector is zero (the expert is the base): not read at all */
    KEEP_THRESHOLD = 2, /* keep |τ| >= threshold (TIES topk_scope=model) */
    KEEP_TOPK = 3,      /* keep |τ| > threshold, plus the first `need` entries equal to it */
    KEEP_RANDOM = 4     /* keep where the counter-based uniform u < keep_prob (DARE) */
};
enum { RESCALE_NONE = 0, RESCALE_DIVIDE = 1, RESCALE_MULTIPLY = 2 };
/* the unweighted elections (PEFT's TIES) are declined here: SUPPORTED_ELECTIONS in merge.py */
enum { ELECT_NONE = 0, ELECT_SUM = 1, ELECT_COUNT = 2, ELECT_UNWEIGHTED_SUM = 3, ELECT_UNWEIGHTED_COUNT = 4 };
enum { DIV_NONE = 0, DIV_WEIGHT = 1, DIV_COUNT = 2, DIV_CONSTANT = 3 };
enum { TM_OK = 0, TM_ENOMEM = -1, TM_EINVAL = -2, TM_ERANGE = -3 };

/* Mirrored field by field by ctypes in tritonmerge/ops/cpu_kernels.py (checked via tm_args_size). */
typedef struct {
    int32_t n_experts;
    int32_t n_threads;
    int64_t numel;
    int64_t offset; /* flat index of element 0 in the whole tensor (row chunks): RNG counter */
    const void *base;
    void *out;
    int32_t base_dtype;
    int32_t out_dtype;
    int32_t subtract_base; /* 1: τ = expert − base; 0 (linear): τ = expert */
    int32_t add_base;      /* 1: out = base + λ·merged; 0: out = merged */
    int32_t election;
    int32_t divide;
    float lambda;
    float divide_constant;
    const void *experts[TM_MAX_EXPERTS];
    int32_t expert_dtype[TM_MAX_EXPERTS];
    int32_t keep_mode[TM_MAX_EXPERTS];
    int32_t rescale_mode[TM_MAX_EXPERTS];
    float threshold[TM_MAX_EXPERTS];
    float keep_prob[TM_MAX_EXPERTS];
    float rescale_value[TM_MAX_EXPERTS];
    float weight[TM_MAX_EXPERTS];
    uint32_t key0[TM_MAX_EXPERTS];
    uint32_t key1[TM_MAX_EXPERTS];
    int64_t need[TM_MAX_EXPERTS]; /* KEEP_TOPK: how many entries equal to the threshold to keep */
    int64_t tied[TM_MAX_EXPERTS]; /* KEEP_TOPK: how many entries equal the threshold in all */
    /* KEEP_TOPK: entries equal to the threshold per (segment, expert), from tm_topk_select;
       NULL makes tm_merge count them itself (one more read) when only some ties are kept */
    const int64_t *seg_ties;
    int32_t n_segments;
    int32_t reserved;
    /* tm_merge: where to add the number of NaN/Inf entries it wrote (may be NULL), so that the
       caller's finiteness check of the output needs no read of its own */
    int64_t *nonfinite;
    /* tm_merge: where to add a count that is nonzero whenever an input it read (base, experts
       not KEEP_NONE) holds a NaN/Inf (may be NULL): the input check without a read of its own.
       Counted on the loaded base and on τ before masking; τ of finite inputs can overflow to
       Inf, so a nonzero count only tells the caller to run its exact per-model check. */
    int64_t *input_nonfinite;
} tm_args;

int tm_abi_version(void) { return TM_ABI_VERSION; }
int64_t tm_args_size(void) { return (int64_t)sizeof(tm_args); }
int tm_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------- */
/* Scalar helpers                                                                             */

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

/* torch's c10::BFloat16 rounding: round to nearest even, NaN -> 0x7FC0. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u = float_to_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE binary16 -> binary32, exact. */
static inline float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    if (exponent == 0) { /* zero or subnormal: mantissa · 2^-24, exact in float32 */
        float f = (float)mantissa * 0x1p-24f;
        return sign ? -f : f;
    }
    if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/* binary32 -> binary16 with round to nearest even (what torch's .to(float16) does). */
static inline uint16_t float_to_f16(float f) {
    uint32_t u = float_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;   /* NaN */
    if (a >= 0x477FF000u) return sign | 0x7C00u;  /* >= 65520 rounds to infinity */
    if (a < 0x38800000u) {                        /* below 2^-14: subnormal result */
        /* Adding 0.5 puts the value's 2^-24 units in the low mantissa bits with RNE. */
        float shifted = bits_to_float(a) + 0.5f;
        return sign | (uint16_t)(float_to_bits(shifted) - 0x3F000000u);
    }
    a -= (uint32_t)112 << 23; /* rebias the exponent from 127 to 15 */
    a += 0xFFFu + ((a >> 13) & 1u);
    return sign | (uint16_t)(a >> 13);
}

/* The hash of ops/rng.py: two rounds of MurmurHash3's fmix32 over (index, keys). */
static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

static inline uint32_t hash_index(uint64_t index, uint32_t key0, uint32_t key1) {
    uint32_t lo = (uint32_t)index, hi = (uint32_t)(index >> 32);
    uint32_t h = fmix32(lo * 0x9E3779B1u + key0);
    return fmix32(h ^ (hi * 0x85EBCA6Bu + key1));
}

/* Uniform in [0, 1): the top 24 bits times 2^-24, exact in float32 (ops/rng.uniform). */
static inline float hash_uniform(uint32_t h) { return (float)(int32_t)(h >> 8) * 0x1p-24f; }

/* ---------------------------------------------------------------------------------------- */
/* Block loaders: float32 values (or τ = e − b) of elements [start, start + m)               */

TM_INLINE void load_block(const void *src, int dtype, int64_t start, int m, float *restrict dst) {
    if (dtype == TM_F32) {
        memcpy(dst, (const float *)src + start, (size_t)m * sizeof(float));
    } else if (dtype == TM_BF16) {
        const uint16_t *restrict s = (const uint16_t *)src + start;
        for (int j = 0; j < m; j++) dst[j] = bf16_to_float(s[j]);
    } else {
        const uint16_t *restrict s = (const uint16_t *)src + start;
        for (int j = 0; j < m; j++) dst[j] = f16_to_float(s[j]);
    }
}

TM_INLINE void load_tau(const void *src, int dtype, int64_t start, int m, const float *restrict b,
                        int subtract, float *restrict t) {
    if (!subtract) {
        load_block(src, dtype, start, m, t);
        return;
    }
    if (dtype == TM_F32) {
        const float *restrict s = (const float *)src + start;
        for (int j = 0; j < m; j++) t[j] = s[j] - b[j];
    } else if (dtype == TM_BF16) {
        const uint16_t *restrict s = (const uint16_t *)src + start;
        for (int j = 0; j < m; j++) t[j] = bf16_to_float(s[j]) - b[j];
    } else {
        const uint16_t *restrict s = (const uint16_t *)src + start;
        for (int j = 0; j < m; j++) t[j] = f16_to_float(s[j]) - b[j];
    }
}

TM_INLINE void store_block(void *dst, int dtype, int64_t start, int m, const float *restrict v) {
    if (dtype == TM_F32) {
        memcpy((float *)dst + start, v, (size_t)m * sizeof(float));
    } else if (dtype == TM_BF16) {
        uint16_t *restrict d = (uint16_t *)dst + start;
        for (int j = 0; j < m; j++) d[j] = float_to_bf16(v[j]);
    } else {
        uint16_t *restrict d = (uint16_t *)dst + start;
        for (int j = 0; j < m; j++) d[j] = float_to_f16(v[j]);
    }
}

static int valid_dtype(int d) { return d == TM_F32 || d == TM_BF16 || d == TM_F16; }

static int check_args(const tm_args *a) {
    if (a->n_experts < 0 || a->n_experts > TM_MAX_EXPERTS || a->numel < 0) return TM_EINVAL;
    if ((a->subtract_base || a->add_base) && !valid_dtype(a->base_dtype)) return TM_EINVAL;
    for (int i = 0; i < a->n_experts; i++)
        if (a->keep_mode[i] != KEEP_NONE && !valid_dtype(a->expert_dtype[i])) return TM_EINVAL;
    return TM_OK;
}

/* Segments: contiguous runs of whole chunks, TM_SEGMENTS_PER_THREAD per thread (at most
   TM_MAX_SEGMENTS), handed out dynamically: with more than one per thread, a thread that loses
   its core to another process (or to the engine's reader and writer threads) no longer holds
   up the others at the end of the loop. */
#define TM_SEGMENTS_PER_THREAD 4
static int32_t split_count(int64_t numel, int32_t threads, int32_t per_thread) {
    int64_t chunks = (numel + TM_CHUNK - 1) / TM_CHUNK;
    int64_t s = (int64_t)(threads > 0 ? threads : 1) * per_thread;
    if (s > TM_MAX_SEGMENTS) s = TM_MAX_SEGMENTS;
    if (s > chunks) s = chunks;
    int64_t at_least = (numel + TM_SEGMENT_MAX - 1) / TM_SEGMENT_MAX;
    if (s < at_least) s = at_least; /* only for tensors beyond 2^35 elements */
    return s < 1 ? 1 : (int32_t)s;
}

int32_t tm_segment_count(int64_t numel, int32_t threads) { return split_count(numel, threads, TM_SEGMENTS_PER_THREAD); }

static void segment_range(int64_t numel, int32_t segments, int32_t s, int64_t *start, int64_t *end) {
    int64_t chunks = (numel + TM_CHUNK - 1) / TM_CHUNK;
    int64_t c0 = chunks * s / segments, c1 = chunks * (s + 1) / segments;
    *start = c0 * TM_CHUNK;
    *end = c1 * TM_CHUNK < numel ? c1 * TM_CHUNK : numel;
}

static int thread_count(const tm_args *a, int32_t segments) {
    int nt = a->n_threads > 0 ? a->n_threads : 1;
    return nt < segments ? nt : segments;
}

/* Scratch per thread: base, acc, div, total and one block per expert. */
static size_t scratch_floats(void) { return (size_t)(4 + TM_MAX_EXPERTS) * TM_BLOCK; }

static inline int block_len(int64_t s, int64_t end) { return (int)(end - s < TM_BLOCK ? end - s : TM_BLOCK); }

/* NaN/Inf entries of a float32 block (exponent bits all ones). */
TM_INLINE int64_t block_nonfinite(const float *restrict v, int m) {
    uint32_t c = 0;
    for (int j = 0; j < m; j++) c += (float_to_bits(v[j]) & 0x7F800000u) == 0x7F800000u;
    return c;
}

/* NaN/Inf entries of a float64 block (x − x is 0 exactly for finite x). */
TM_INLINE int64_t block_nonfinite_f64(const double *restrict v, int m) {
    int64_t c = 0;
    for (int j = 0; j < m; j++) c += (v[j] - v[j]) != 0.0;
    return c;
}

/* ---------------------------------------------------------------------------------------- */
/* The exact top-k threshold: two histogram passes over |τ|'s float32 bits (radix select)      */

/* High-bits histogram of |τ| (bits 30..16) for the experts in `which`; τ ≡ 0 counts in bin 0. */
TM_HOT void tm_hist_high_range(const tm_args *a, int64_t start, int64_t end, uint32_t which, float *scratch,
                               uint32_t *hist) {
    float *b = scratch, *t = scratch + TM_BLOCK;
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        if (a->subtract_base) load_block(a->base, a->base_dtype, s, m, b);
        for (int i = 0; i < a->n_experts; i++) {
            if (!((which >> i) & 1u)) continue;
            uint32_t *h = hist + (size_t)i * TM_HIGH_BINS;
            if (a->keep_mode[i] == KEEP_NONE) {
                h[0] += (uint32_t)m;
                continue;
            }
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            for (int j = 0; j < m; j++) h[(float_to_bits(t[j]) & 0x7FFFFFFFu) >> 16]++;
        }
    }
}

/* Low 16 bits of |τ| for the entries whose high bits equal bins[i]. */
TM_HOT void tm_hist_low_range(const tm_args *a, int64_t start, int64_t end, uint32_t which, const int32_t *bins,
                              float *scratch, uint32_t *hist) {
    float *b = scratch, *t = scratch + TM_BLOCK;
    uint32_t *restrict u = (uint32_t *)(scratch + 2 * TM_BLOCK); /* only ever used as uint32 */
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        if (a->subtract_base) load_block(a->base, a->base_dtype, s, m, b);
        for (int i = 0; i < a->n_experts; i++) {
            if (!((which >> i) & 1u)) continue;
            uint32_t *h = hist + (size_t)i * TM_LOW_BINS;
            if (a->keep_mode[i] == KEEP_NONE) {
                if (bins[i] == 0) h[0] += (uint32_t)m;
                continue;
            }
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            const uint32_t bin = (uint32_t)bins[i];
            /* about 1% of entries fall in the bin: offsets from the bin start, computed
               vectorised; an entry is in the bin iff its offset is below 2^16 */
            for (int j = 0; j < m; j++) u[j] = (float_to_bits(t[j]) & 0x7FFFFFFFu) - (bin << 16);
            for (int j = 0; j < m; j++)
                if (u[j] < TM_LOW_BINS) h[u[j]]++;
        }
    }
}

/*
 * Histograms per segment (uint32, `per_segment` = NULL: summed into `out` as uint64 and freed).
 * bins == NULL: the high-bits histogram, else the low bits within bins[i].
 */
static int histogram(const tm_args *a, uint32_t which, const int32_t *bins, uint64_t *out, uint32_t **per_segment) {
    const int n = a->n_experts;
    const size_t nbins = bins ? TM_LOW_BINS : TM_HIGH_BINS;
    const size_t size = (size_t)n * nbins;
    /* the merge's segments where their counts are kept, else one per thread (each segment
       zeroes and flushes its own histograms: fewer is cheaper) */
    const int32_t segments = per_segment ? tm_segment_count(a->numel, a->n_threads) : split_count(a->numel, a->n_threads, 1);
    memset(out, 0, size * sizeof(uint64_t));
    if (a->numel == 0 || which == 0) return TM_OK;
    int failed = 0;
#pragma omp parallel num_threads(thread_count(a, segments))
    {
        float *scratch = malloc(scratch_floats() * sizeof(float));
#pragma omp for schedule(dynamic, 1)
        for (int32_t s = 0; s < segments; s++) {
            uint32_t *local = calloc(size, sizeof(uint32_t));
            if (!local || !scratch) {
                free(local);
#pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t start, end;
            segment_range(a->numel, segments, s, &start, &end);
            if (bins)
                tm_hist_low_range(a, start, end, which, bins, scratch, local);
            else
                tm_hist_high_range(a, start, end, which, scratch, local);
#pragma omp critical(tm_hist_flush)
            for (size_t k = 0; k < size; k++) out[k] += local[k];
            if (per_segment)
                per_segment[s] = local;
            else
                free(local);
        }
        free(scratch);
    }
    return failed ? TM_ENOMEM : TM_OK;
}

/* hist: n_experts × 32768 uint64 (bins of |τ| bits >> 16). */
int tm_hist_high(const tm_args *a, uint32_t which, uint64_t *hist) {
    int rc = check_args(a);
    return rc ? rc : histogram(a, which, NULL, hist, NULL);
}

/* hist: n_experts × 65536 uint64 (|τ| & 0xFFFF among entries in high bin bins[i]). */
int tm_hist_low(const tm_args *a, uint32_t which, const int32_t *bins, uint64_t *hist) {
    int rc = check_args(a);
    return rc ? rc : histogram(a, which, bins, hist, NULL);
}

/* Largest bin b with count(bin >= b) >= k; *rest = k − count(bin > b). k must be in [1, total]. */
static int find_bin(const uint64_t *h, int nbins, int64_t k, int *bin, int64_t *rest) {
    uint64_t above = 0;
    for (int b = nbins - 1; b >= 0; b--) {
        if (above + h[b] >= (uint64_t)k) {
            *bin = b;
            *rest = k - (int64_t)above;
            return TM_OK;
        }
        above += h[b];
    }
    return TM_ERANGE;
}

/* Tensors up to this size take a quickselect instead of the histograms (whose 3 MiB of bins
   would cost more than the data). */
#define TM_SMALL_SELECT ((int64_t)1 << 17)

/* The k-th largest (1-based) of v[0..n) by 3-way quickselect on the bit patterns (non-negative
   floats order like their uint32 bits); v is permuted. */
static uint32_t kth_largest_bits(uint32_t *v, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        uint32_t x = v[lo], y = v[lo + (hi - lo) / 2], z = v[hi]; /* median of three */
        uint32_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t lt = lo, i = lo, gt = hi; /* [lo, lt) > pivot, [lt, i) == pivot, (gt, hi] < pivot */
        while (i <= gt) {
            uint32_t value = v[i];
            if (value > pivot) {
                v[i++] = v[lt];
                v[lt++] = value;
            } else if (value < pivot) {
                v[i] = v[gt];
                v[gt--] = value;
            } else {
                i++;
            }
        }
        if (target < lt)
            hi = lt - 1;
        else if (target > gt)
            lo = gt + 1;
        else
            return pivot;
    }
    return v[lo];
}

static int topk_select_small(const tm_args *a, uint32_t which, const int64_t *k, float *threshold, int64_t *greater,
                             int64_t *tied, int64_t *seg_ties) {
    const int64_t numel = a->numel;
    uint32_t *v = malloc((size_t)numel * sizeof(uint32_t));
    float *scratch = malloc(scratch_floats() * sizeof(float));
    if (!v || !scratch) {
        free(v);
        free(scratch);
        return TM_ENOMEM;
    }
    float *b = scratch, *t = scratch + TM_BLOCK;
    for (int i = 0; i < a->n_experts; i++) {
        if (seg_ties) seg_ties[i] = 0;
        if (!((which >> i) & 1u)) continue;
        for (int64_t s = 0; s < numel; s += TM_BLOCK) {
            const int m = block_len(s, numel);
            if (a->keep_mode[i] == KEEP_NONE) {
                for (int j = 0; j < m; j++) v[s + j] = 0;
                continue;
            }
            if (a->subtract_base) load_block(a->base, a->base_dtype, s, m, b);
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            for (int j = 0; j < m; j++) v[s + j] = float_to_bits(t[j]) & 0x7FFFFFFFu;
        }
        const uint32_t thr = kth_largest_bits(v, numel, k[i]);
        int64_t above = 0, equal = 0;
        for (int64_t j = 0; j < numel; j++) {
            above += v[j] > thr;
            equal += v[j] == thr;
        }
        threshold[i] = bits_to_float(thr);
        greater[i] = above;
        tied[i] = equal;
        if (seg_ties) seg_ties[i] = equal; /* one segment */
    }
    free(v);
    free(scratch);
    return TM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* The exact top-k threshold from a sample bracket, usually in one pass (histograms: fallback) */

/*
 * Why: the radix select reads base + experts twice. A strided sample (1/64 of the entries, in
 * runs of TM_SAMPLE_RUN at hashed offsets, deterministic) brackets the k-th largest |τ| in
 * [lo, hi]. One pass over base and every expert (base read once) then counts per
 * (segment, expert) the entries above hi, histograms the entries in [lo, hi] (the candidates,
 * ~1-2% of the tensor) in TM_BRACKET_BINS coarse bins, and copies their |τ| bits into a buffer.
 * When fewer than k entries lie above hi and at least k at or above lo, the coarse histogram
 * names the bin of the k-th largest and an exact selection among that bin's candidates gives
 * the threshold, the counts and the per-segment ties: the same answer as the histograms.
 * Otherwise another pass follows over a new bracket: the bin of the k-th largest when the
 * buffers overflowed (heavy ties: with bins of one value the histogram alone is exact), or the
 * range beyond the bracket when it missed. Each such pass narrows the range by the bin count,
 * so a few passes always finish; TM_BRACKET_PASSES bounds them before the histogram fallback.
 */
#define TM_SAMPLE_RUN 64         /* contiguous entries per sampled run (2–4 cache lines) */
#define TM_SAMPLE_WINDOW 4096    /* one run per window: a 1/64 sample */
#define TM_SAMPLE_MIN 32768      /* smaller windows (down to 256) until the sample is this big */
#define TM_SAMPLE_MAX 262144     /* larger windows until the sample is at most this big */
#define TM_SAMPLE_SIGMAS 4.0     /* bracket half-width in standard deviations of the sample rank */
#define TM_SAMPLE_CORRELATION 2.0 /* entries of a run are not independent: variance inflation */
#define TM_BRACKET_BINS 4096
#define TM_BRACKET_PASSES 6
/* candidates a narrowed pass may buffer per expert (beyond it: one more narrowing pass) */
#define TM_BRACKET_MAX_BUFFER ((int64_t)1 << 24)

/* tm_topk_select's path[i]: how the threshold was found (TM_PATH_BRACKET + passes for the bracket) */
enum { TM_PATH_NONE = 0, TM_PATH_QUICKSELECT = 1, TM_PATH_HIST = 2, TM_PATH_HIST_FALLBACK = 3, TM_PATH_BRACKET = 10 };
/* flags of tm_topk_select (tests): */
#define TM_SELECT_NO_SAMPLE 1u   /* straight to the histograms */
#define TM_SELECT_NARROW 2u      /* a bracket of one sample value (forces misses on continuous data) */
#define TM_SELECT_TINY 4u        /* candidate buffers of 64 entries (forces overflows, narrowing) */

/* Window -> run offset inside it: hashed, so that runs do not sit at the same columns of a
   row-major matrix whose rows are a multiple of the window. */
static inline int64_t sample_offset(int64_t w, int64_t window) {
    return (int64_t)(fmix32((uint32_t)w * 0x9E3779B1u + 0x5EEDu) % (uint32_t)(window / TM_SAMPLE_RUN)) * TM_SAMPLE_RUN;
}

static inline void prefetch_run(const void *p, int dtype, int64_t start) {
    const char *c = (const char *)p + start * (dtype == TM_F32 ? 4 : 2);
    for (int off = 0; off < TM_SAMPLE_RUN * (dtype == TM_F32 ? 4 : 2); off += 64) __builtin_prefetch(c + off);
}

typedef struct {
    uint32_t lo, hi; /* the bracket, |τ| bits inclusive */
    int32_t shift;   /* coarse bin of a candidate: (bits − lo) >> shift */
} tm_bracket;

typedef struct {
    uint32_t *hist;  /* TM_BRACKET_BINS counts of candidates */
    uint32_t *buf;   /* candidate |τ| bits, up to cap */
    int64_t cap;
    int64_t count;   /* candidates seen (more than cap: overflow, buf incomplete) */
    int64_t above;   /* entries with |τ| bits > hi */
} tm_bucket;

static int32_t bracket_shift(uint32_t lo, uint32_t hi) {
    int32_t s = 0;
    while (((hi - lo) >> s) >= TM_BRACKET_BINS) s++;
    return s;
}

#ifdef TM_AVX512_SCAN
/*
 * The bracket's scan of one block with AVX-512 compress: the count of |τ| bits above hi, and the
 * bits inside [lo, hi] packed into out in index order (out has room for m + 16). The portable
 * loop visits candidates through a byte flag per entry, a data-dependent branch every 8 entries
 * that took a third of the pass; this one has none. Returns how many were packed.
 */
__attribute__((target("avx512f"))) static int scan_bracket_avx512(const float *restrict t, int m, uint32_t lo,
                                                                    uint32_t width, uint32_t hi, uint32_t *restrict out,
                                                                    uint32_t *above) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), vlo = _mm512_set1_epi32((int)lo);
    const __m512i vwidth = _mm512_set1_epi32((int)width), vhi = _mm512_set1_epi32((int)hi);
    int c = 0;
    uint32_t up = 0;
    for (int j = 0; j < m; j += 16) {
        const __mmask16 live = m - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - j)) - 1u);
        const __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi32(live, t + j), magnitude);
        const __mmask16 over = _mm512_mask_cmpgt_epu32_mask(live, v, vhi);
        const __mmask16 inside = _mm512_mask_cmple_epu32_mask(live, _mm512_sub_epi32(v, vlo), vwidth);
        up += (uint32_t)__builtin_popcount((unsigned)over);
        _mm512_storeu_si512((void *)(out + c), _mm512_maskz_compress_epi32(inside, v));
        c += __builtin_popcount((unsigned)inside);
    }
    *above = up;
    return c;
}

static int have_avx512(void) {
    static int known = -1; /* a benign race: every thread computes the same value */
    if (known < 0) known = __builtin_cpu_supports("avx512f") ? 1 : 0;
    return known;
}
#endif

/* One pass over [start, end) for the experts in `which`: per expert the entries above its
   bracket, and the histogram and bits of those inside. */
TM_HOT void tm_bracket_range(const tm_args *a, int64_t start, int64_t end, uint32_t which, const tm_bracket *br,
                             float *scratch, tm_bucket *buckets) {
    float *b = scratch, *t = scratch + TM_BLOCK;
    uint32_t *restrict u = (uint32_t *)(scratch + 2 * TM_BLOCK);
    uint8_t *restrict flag = (uint8_t *)(scratch + 3 * TM_BLOCK); /* TM_BLOCK bytes, 8-aligned */
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        const int m8 = (m + 7) & ~7;
        if (a->subtract_base) load_block(a->base, a->base_dtype, s, m, b);
        for (int i = 0; i < a->n_experts; i++) {
            if (!((which >> i) & 1u)) continue;
            tm_bucket *bk = &buckets[i];
            if (a->keep_mode[i] == KEEP_NONE)
                for (int j = 0; j < m; j++) t[j] = 0.0f;
            else
                load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            const uint32_t h = br[i].hi, l = br[i].lo, width = br[i].hi - br[i].lo;
            const int32_t shift = br[i].shift;
#ifdef TM_AVX512_SCAN
            if (have_avx512()) { /* u's 16 entries past TM_BLOCK are the flag bytes, unused here */
                uint32_t above = 0;
                const int found = scan_bracket_avx512(t, m, l, width, h, u, &above);
                bk->above += above;
                uint32_t *restrict hist = bk->hist;
                for (int q = 0; q < found; q++) hist[(u[q] - l) >> shift]++;
                int64_t room = bk->cap - bk->count;
                if (room > 0) memcpy(bk->buf + bk->count, u, (size_t)(found < room ? found : room) * sizeof(uint32_t));
                bk->count += found;
                continue;
            }
#endif
            uint32_t above = 0; /* 32-bit: the loop vectorises with full-width lanes */
            /* vectorised: |τ| bits, the count above, and a byte flag per candidate */
            for (int j = 0; j < m; j++) {
                const uint32_t v = float_to_bits(t[j]) & 0x7FFFFFFFu;
                u[j] = v;
                above += v > h;
                flag[j] = (uint8_t)((v - l) <= width); /* v − l wraps below lo */
            }
            for (int j = m; j < m8; j++) flag[j] = 0;
            bk->above += above;
            /* candidates are rare: test 8 flags at a time, visit the set ones in index order */
            uint32_t *restrict hist = bk->hist;
            int64_t count = bk->count;
            const int64_t cap = bk->cap;
            for (int g = 0; g < m8; g += 8) {
                uint64_t x;
                memcpy(&x, flag + g, 8);
                while (x) {
                    const int j = g + (__builtin_ctzll(x) >> 3);
                    x &= x - 1;
                    const uint32_t v = u[j];
                    hist[(v - l) >> shift]++;
                    if (count < cap) bk->buf[count] = v;
                    count++;
                }
            }
            bk->count = count;
        }
    }
}

/* Experts whose bracket resolved: threshold and counts from the pass (see topk_select_bracket). */
static int resolve_bracket(int n, int i, int32_t segments, const tm_bracket *br, const tm_bucket *buckets, int64_t k,
                           float *threshold, int64_t *greater, int64_t *tied,
                           int64_t *seg_ties, int *need_narrow, int32_t *bin_out) {
    int64_t cum = 0, overflow = 0;
    for (int32_t s = 0; s < segments; s++) {
        cum += buckets[(size_t)s * n + i].above;
        overflow |= buckets[(size_t)s * n + i].count > buckets[(size_t)s * n + i].cap;
    }
    uint64_t *total = (uint64_t *)malloc(TM_BRACKET_BINS * sizeof(uint64_t));
    if (!total) return TM_ENOMEM;
    for (int b = 0; b < TM_BRACKET_BINS; b++) total[b] = 0;
    for (int32_t s = 0; s < segments; s++) {
        const uint32_t *h = buckets[(size_t)s * n + i].hist;
        for (int b = 0; b < TM_BRACKET_BINS; b++) total[b] += h[b];
    }
    int bin = -1;
    for (int b = TM_BRACKET_BINS - 1; b >= 0; b--) {
        if (cum + (int64_t)total[b] >= k) {
            bin = b;
            break;
        }
        cum += (int64_t)total[b];
    }
    const int64_t in_bin = bin >= 0 ? (int64_t)total[bin] : 0;
    free(total);
    *bin_out = bin;
    *need_narrow = 0;
    if (bin < 0) return TM_ERANGE; /* the caller checked the bracket holds the k-th largest */
    if (br->shift == 0) { /* a bin is one value: the histogram is the answer */
        threshold[i] = bits_to_float(br->lo + (uint32_t)bin);
        greater[i] = cum;
        tied[i] = in_bin;
        if (seg_ties)
            for (int32_t s = 0; s < segments; s++) seg_ties[(size_t)s * n + i] = buckets[(size_t)s * n + i].hist[bin];
        return TM_OK;
    }
    if (overflow) {
        *need_narrow = 1;
        return TM_OK;
    }
    /* the candidates of the k-th's bin, segment after segment; exact selection among them */
    uint32_t *all = malloc((size_t)(in_bin + 1) * sizeof(uint32_t)); /* +1: the compaction's spare slot */
    int64_t *seg_start = malloc((size_t)(segments + 1) * sizeof(int64_t));
    if (!all || !seg_start) {
        free(all);
        free(seg_start);
        return TM_ENOMEM;
    }
    int64_t at = 0;
    for (int32_t s = 0; s < segments; s++) {
        const tm_bucket *bk = &buckets[(size_t)s * n + i];
        seg_start[s] = at;
        const uint32_t lo = br->lo + ((uint32_t)bin << br->shift), width = (uint32_t)((1ull << br->shift) - 1);
        for (int64_t j = 0; j < bk->count; j++) { /* branch-free compaction (a spare slot at the end) */
            const uint32_t v = bk->buf[j] & 0x7FFFFFFFu; /* bit 31: tm_sign_agreement_topk's flag */
            all[at] = v;
            at += (v - lo) <= width;
        }
    }
    seg_start[segments] = at;
    int64_t gt = 0, eq = 0;
    uint32_t thr;
    {
        uint32_t *copy = malloc((size_t)(at > 0 ? at : 1) * sizeof(uint32_t));
        if (!copy) {
            free(all);
            free(seg_start);
            return TM_ENOMEM;
        }
        memcpy(copy, all, (size_t)at * sizeof(uint32_t));
        thr = kth_largest_bits(copy, at, k - cum);
        free(copy);
    }
    for (int32_t s = 0; s < segments; s++) {
        int64_t here = 0;
        for (int64_t j = seg_start[s]; j < seg_start[s + 1]; j++) {
            gt += all[j] > thr;
            here += all[j] == thr;
        }
        eq += here;
        if (seg_ties) seg_ties[(size_t)s * n + i] = here;
    }
    free(all);
    free(seg_start);
    threshold[i] = bits_to_float(thr);
    greater[i] = cum + gt;
    tied[i] = eq;
    return TM_OK;
}

/* The initial brackets from the sample (ns experts sel[], each m sampled |τ| bits). */
static int sample_brackets(const tm_args *a, const int *sel, int ns, const int64_t *k, uint32_t flags,
                           tm_bracket *br, int64_t *expected) {
    const int64_t numel = a->numel;
    int64_t window = TM_SAMPLE_WINDOW;
    while (window > 256 && numel / window * TM_SAMPLE_RUN < TM_SAMPLE_MIN) window /= 2;
    while (numel / window * TM_SAMPLE_RUN > TM_SAMPLE_MAX) window *= 2;
    const int64_t windows = numel / window, m = windows * TM_SAMPLE_RUN;
    for (int q = 0; q < ns; q++) { /* no sample: the whole range */
        br[sel[q]].lo = 0;
        br[sel[q]].hi = 0xFFFFFFFFu;
        expected[sel[q]] = numel;
    }
    if (m < 1024) return TM_OK;
    uint32_t *hist = calloc((size_t)ns * TM_HIGH_BINS, sizeof(uint32_t));
    if (!hist) return TM_ENOMEM;
    /* per thread its own histograms (counts add up in any order: deterministic) */
    int nt = a->n_threads > 0 ? a->n_threads : 1;
    if (nt > 16) nt = 16;
    if (numel < ((int64_t)1 << 22)) nt = 1; /* not worth waking threads for */
    uint32_t *local_all = calloc((size_t)nt * ns * TM_HIGH_BINS, sizeof(uint32_t));
    if (!local_all) {
        free(hist);
        return TM_ENOMEM;
    }
#pragma omp parallel num_threads(nt)
    {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        uint32_t *local = local_all + (size_t)me * ns * TM_HIGH_BINS;
        float bb[TM_SAMPLE_RUN], tt[TM_SAMPLE_RUN];
#pragma omp for schedule(static)
        for (int64_t w = 0; w < windows; w++) {
            const int64_t s = w * window + sample_offset(w, window);
            if (w + 4 < windows) { /* the runs are too far apart for the hardware prefetchers */
                const int64_t ahead = (w + 4) * window + sample_offset(w + 4, window);
                if (a->subtract_base) prefetch_run(a->base, a->base_dtype, ahead);
                for (int q = 0; q < ns; q++)
                    if (a->keep_mode[sel[q]] != KEEP_NONE) prefetch_run(a->experts[sel[q]], a->expert_dtype[sel[q]], ahead);
            }
            if (a->subtract_base) load_block(a->base, a->base_dtype, s, TM_SAMPLE_RUN, bb);
            for (int q = 0; q < ns; q++) {
                const int i = sel[q];
                uint32_t *h = local + (size_t)q * TM_HIGH_BINS;
                if (a->keep_mode[i] == KEEP_NONE) {
                    h[0] += TM_SAMPLE_RUN;
                    continue;
                }
                load_tau(a->experts[i], a->expert_dtype[i], s, TM_SAMPLE_RUN, bb, a->subtract_base, tt);
                for (int j = 0; j < TM_SAMPLE_RUN; j++) h[(float_to_bits(tt[j]) & 0x7FFFFFFFu) >> 16]++;
            }
        }
    }
    for (int r = 0; r < nt; r++)
        for (size_t q = 0; q < (size_t)ns * TM_HIGH_BINS; q++) hist[q] += local_all[(size_t)r * ns * TM_HIGH_BINS + q];
    free(local_all);
    for (int q = 0; q < ns; q++) {
        const int i = sel[q];
        const uint32_t *h = hist + (size_t)q * TM_HIGH_BINS;
        const double p = (double)k[i] / (double)numel;
        const double sd = sqrt(TM_SAMPLE_CORRELATION * (double)m * p * (1.0 - p));
        const int64_t margin = (flags & TM_SELECT_NARROW) ? 0 : (int64_t)ceil(TM_SAMPLE_SIGMAS * sd) + 8;
        int64_t r = (int64_t)ceil(p * (double)m);
        if (r < 1) r = 1;
        const int64_t rh = r - margin, rl = r + margin; /* sample ranks, 1 = largest */
        /* bins (high 15 bits) holding those ranks; the bracket takes them whole */
        int64_t cum = 0;
        int bin_h = -1, bin_l = -1;
        for (int b = TM_HIGH_BINS - 1; b >= 0 && bin_l < 0; b--) {
            cum += h[b];
            if (bin_h < 0 && rh >= 1 && cum >= rh) bin_h = b;
            if (cum >= rl) bin_l = b;
        }
        br[i].hi = bin_h >= 0 ? ((uint32_t)bin_h << 16) | 0xFFFFu : 0xFFFFFFFFu;
        br[i].lo = bin_l >= 0 ? (uint32_t)bin_l << 16 : 0;
        if (flags & TM_SELECT_NARROW) { /* one value: the lowest of the bin, for tests */
            br[i].hi = br[i].lo;
        }
        /* candidates expected: the sample's share in [lo, hi] */
        int64_t inside = 0;
        for (int b = (int)(br[i].lo >> 16); b <= (int)(br[i].hi >> 16) && b < TM_HIGH_BINS; b++) inside += h[b];
        expected[i] = (int64_t)ceil((double)numel * (double)inside / (double)m);
    }
    free(hist);
    return TM_OK;
}

/*
 * Resolve the experts of `which` by brackets: *done gets those resolved (the rest need the
 * histograms), path[i] how many passes it took. seg_ties as tm_topk_select.
 */
static int topk_select_bracket(const tm_args *a, uint32_t which, const int64_t *k, uint32_t flags, float *threshold,
                               int64_t *greater, int64_t *tied, int64_t *seg_ties, int32_t *path, uint32_t *done) {
    const int n = a->n_experts;
    const int64_t numel = a->numel;
    const int32_t segments = tm_segment_count(numel, a->n_threads);
    *done = 0;
    int sel[TM_MAX_EXPERTS], ns = 0;
    for (int i = 0; i < n; i++)
        if ((which >> i) & 1u) sel[ns++] = i;
    if (ns == 0) return TM_OK;

    tm_bracket br[TM_MAX_EXPERTS];
    int64_t expected[TM_MAX_EXPERTS] = {0};
    int rc = sample_brackets(a, sel, ns, k, flags, br, expected);
    if (rc) return rc;
    /* per (segment, expert) capacities: from the sample's estimate, later from exact counts */
    int64_t *caps = malloc((size_t)segments * n * sizeof(int64_t));
    tm_bucket *buckets = calloc((size_t)segments * n, sizeof(tm_bucket));
    if (!caps || !buckets) {
        free(caps);
        free(buckets);
        return TM_ENOMEM;
    }
    for (int q = 0; q < ns; q++) {
        const int i = sel[q];
        br[i].shift = bracket_shift(br[i].lo, br[i].hi);
        const int64_t c = expected[i] >= numel / 2 ? 0 : 2 * expected[i] / segments + 4096; /* 0: histogram only */
        for (int32_t s = 0; s < segments; s++) caps[(size_t)s * n + i] = (flags & TM_SELECT_TINY) ? 64 : c;
    }
    uint32_t todo = which;
    for (int pass = 1; pass <= TM_BRACKET_PASSES && todo && rc == TM_OK; pass++) {
        int failed = 0;
#pragma omp parallel num_threads(thread_count(a, segments))
        {
            float *scratch = malloc(scratch_floats() * sizeof(float));
#pragma omp for schedule(dynamic, 1)
            for (int32_t s = 0; s < segments; s++) {
                tm_bucket *bk = buckets + (size_t)s * n;
                int ok = scratch != NULL;
                for (int i = 0; i < n && ok; i++) {
                    if (!((todo >> i) & 1u)) continue;
                    free(bk[i].buf);
                    free(bk[i].hist);
                    bk[i].cap = caps[(size_t)s * n + i];
                    bk[i].count = bk[i].above = 0;
                    bk[i].buf = malloc((size_t)(bk[i].cap > 0 ? bk[i].cap : 1) * sizeof(uint32_t));
                    bk[i].hist = calloc(TM_BRACKET_BINS, sizeof(uint32_t));
                    ok = bk[i].buf && bk[i].hist;
                }
                if (!ok) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                int64_t start, end;
                segment_range(numel, segments, s, &start, &end);
                tm_bracket_range(a, start, end, todo, br, scratch, bk);
            }
            free(scratch);
        }
        if (failed) {
            rc = TM_ENOMEM;
            break;
        }
        for (int i = 0; i < n && rc == TM_OK; i++) {
            if (!((todo >> i) & 1u)) continue;
            int64_t above = 0, count = 0;
            for (int32_t s = 0; s < segments; s++) {
                above += buckets[(size_t)s * n + i].above;
                count += buckets[(size_t)s * n + i].count;
            }
            if (above >= k[i]) { /* missed low: the k-th is above hi */
                br[i].lo = br[i].hi + 1;
                br[i].hi = 0xFFFFFFFFu;
            } else if (above + count < k[i]) { /* missed high: the k-th is below lo */
                br[i].hi = br[i].lo - 1;
                br[i].lo = 0;
            } else {
                int narrow = 0, bin = -1;
                rc = resolve_bracket(n, i, segments, &br[i], buckets, k[i], threshold, greater, tied,
                                     seg_ties, &narrow, &bin);
                if (rc) break;
                if (!narrow) {
                    todo &= ~(1u << i);
                    *done |= 1u << i;
                    path[i] = TM_PATH_BRACKET + pass;
                    continue;
                }
                /* overflowed: the next bracket is that bin, its candidates counted exactly */
                const uint32_t lo = br[i].lo + ((uint32_t)bin << br[i].shift);
                const uint64_t top = (uint64_t)lo + ((1ull << br[i].shift) - 1); /* 64-bit: may pass 2^32 */
                br[i].lo = lo;
                br[i].hi = top < br[i].hi ? (uint32_t)top : br[i].hi;
                int64_t in_bin = 0;
                for (int32_t s = 0; s < segments; s++) in_bin += buckets[(size_t)s * n + i].hist[bin];
                for (int32_t s = 0; s < segments; s++)
                    caps[(size_t)s * n + i] = (flags & TM_SELECT_TINY)             ? 64
                                              : in_bin <= TM_BRACKET_MAX_BUFFER ? buckets[(size_t)s * n + i].hist[bin]
                                                                                : 0;
                br[i].shift = bracket_shift(br[i].lo, br[i].hi);
                continue;
            }
            /* after a miss: histogram only, the next pass narrows with exact counts */
            br[i].shift = bracket_shift(br[i].lo, br[i].hi);
            for (int32_t s = 0; s < segments; s++) caps[(size_t)s * n + i] = (flags & TM_SELECT_TINY) ? 64 : 0;
        }
    }
    for (size_t q = 0; q < (size_t)segments * n; q++) {
        free(buckets[q].buf);
        free(buckets[q].hist);
    }
    free(buckets);
    free(caps);
    return rc;
}

/*
 * Exact k[i]-th largest |τ| for each expert in `which` (the answer of ops/select.kth_largest),
 * with the number of entries strictly greater and equal to it, and (seg_ties, may be NULL) the
 * number equal to it in each segment: tm_segment_count(numel, n_threads) × n_experts entries,
 * which tm_merge uses to keep the lowest-index ties without another read. path (may be NULL)
 * gets per expert how its threshold was found (TM_PATH_*); flags are TM_SELECT_* (tests).
 * Small tensors: quickselect; else the sample bracket (usually one pass, see topk_select_bracket),
 * the histograms (two passes) for an expert whose brackets all failed.
 */
int tm_topk_select(const tm_args *a, uint32_t which, const int64_t *k, float *threshold, int64_t *greater,
                   int64_t *tied, int64_t *seg_ties, uint32_t flags, int32_t *path) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    const int32_t segments = tm_segment_count(a->numel, a->n_threads);
    int32_t paths[TM_MAX_EXPERTS] = {0};
    for (int i = 0; i < n; i++)
        if (((which >> i) & 1u) && (k[i] < 1 || k[i] > a->numel)) return TM_ERANGE;
    if (seg_ties) memset(seg_ties, 0, (size_t)segments * n * sizeof(int64_t));
    if (segments == 1 && a->numel <= TM_SMALL_SELECT) {
        rc = topk_select_small(a, which, k, threshold, greater, tied, seg_ties);
        for (int i = 0; i < n; i++) paths[i] = ((which >> i) & 1u) ? TM_PATH_QUICKSELECT : TM_PATH_NONE;
        if (path) memcpy(path, paths, (size_t)n * sizeof(int32_t));
        return rc;
    }
    uint32_t done = 0;
    if (!(flags & TM_SELECT_NO_SAMPLE)) {
        rc = topk_select_bracket(a, which, k, flags, threshold, greater, tied, seg_ties, paths, &done);
        if (rc) return rc;
    }
    which &= ~done;
    for (int i = 0; i < n; i++)
        if ((which >> i) & 1u) paths[i] = (flags & TM_SELECT_NO_SAMPLE) ? TM_PATH_HIST : TM_PATH_HIST_FALLBACK;
    if (path) memcpy(path, paths, (size_t)n * sizeof(int32_t));
    if (which == 0) return TM_OK;
    uint64_t *high = malloc((size_t)n * TM_HIGH_BINS * sizeof(uint64_t));
    uint64_t *low = malloc((size_t)n * TM_LOW_BINS * sizeof(uint64_t));
    uint32_t **per_segment = calloc((size_t)segments, sizeof(uint32_t *));
    int32_t bins[TM_MAX_EXPERTS] = {0};
    int32_t los[TM_MAX_EXPERTS] = {0};
    int64_t rest[TM_MAX_EXPERTS] = {0};
    rc = high && low && per_segment ? TM_OK : TM_ENOMEM;
    if (rc == TM_OK) rc = histogram(a, which, NULL, high, NULL);
    for (int i = 0; i < n && rc == TM_OK; i++)
        if ((which >> i) & 1u) {
            int b = 0;
            rc = find_bin(high + (size_t)i * TM_HIGH_BINS, TM_HIGH_BINS, k[i], &b, &rest[i]);
            bins[i] = b;
        }
    if (rc == TM_OK) rc = histogram(a, which, bins, low, per_segment);
    for (int i = 0; i < n && rc == TM_OK; i++) {
        if (!((which >> i) & 1u)) continue;
        const uint64_t *h = high + (size_t)i * TM_HIGH_BINS, *l = low + (size_t)i * TM_LOW_BINS;
        int lo = 0;
        int64_t r;
        rc = find_bin(l, TM_LOW_BINS, rest[i], &lo, &r);
        if (rc) break;
        uint64_t above = 0;
        for (int b = bins[i] + 1; b < TM_HIGH_BINS; b++) above += h[b];
        for (int b = lo + 1; b < TM_LOW_BINS; b++) above += l[b];
        threshold[i] = bits_to_float(((uint32_t)bins[i] << 16) | (uint32_t)lo);
        greater[i] = (int64_t)above;
        tied[i] = (int64_t)l[lo];
        los[i] = lo;
    }
    if (rc == TM_OK && seg_ties)
        for (int32_t s = 0; s < segments; s++)
            for (int i = 0; i < n; i++)
                if ((which >> i) & 1u)
                    seg_ties[(size_t)s * n + i] = per_segment[s] ? per_segment[s][(size_t)i * TM_LOW_BINS + los[i]] : 0;
    if (per_segment)
        for (int32_t s = 0; s < segments; s++) free(per_segment[s]);
    free(per_segment);
    free(high);
    free(low);
    return rc;
}

/* ---------------------------------------------------------------------------------------- */
/* Keep rules, shared by the merge and the L1-norm pre-pass                                    */

/*
 * Zero the entries of t that expert i drops. KEEP_TOPK: *budget is how many more entries equal
 * to the threshold this segment keeps (-1: all of them), consumed in flat order.
 */
TM_INLINE void apply_keep(const tm_args *a, int i, int64_t index0, int m, int64_t *budget, float *restrict t) {
    const float thr = a->threshold[i];
    switch (a->keep_mode[i]) {
    case KEEP_THRESHOLD:
        for (int j = 0; j < m; j++) t[j] = fabsf(t[j]) >= thr ? t[j] : 0.0f;
        break;
    case KEEP_TOPK: {
        int64_t left = *budget;
        if (left > 0) {
            int64_t here = 0;
            for (int j = 0; j < m; j++) here += fabsf(t[j]) == thr;
            if (here <= left) { /* every tie in this block is kept */
                *budget = left - here;
                left = -1;
            }
        }
        if (left < 0) {
            for (int j = 0; j < m; j++) t[j] = fabsf(t[j]) >= thr ? t[j] : 0.0f;
        } else if (left == 0) {
            for (int j = 0; j < m; j++) t[j] = fabsf(t[j]) > thr ? t[j] : 0.0f;
        } else { /* the block where the budget runs out: lowest flat index first */
            for (int j = 0; j < m; j++) {
                float v = fabsf(t[j]);
                int keep = v > thr;
                if (v == thr && left > 0) {
                    keep = 1;
                    left--;
                }
                t[j] = keep ? t[j] : 0.0f;
            }
            *budget = left;
        }
        break;
    }
    case KEEP_RANDOM: {
        const float p = a->keep_prob[i];
        const uint32_t k0 = a->key0[i], k1 = a->key1[i];
        uint64_t first = (uint64_t)index0, last = first + (uint64_t)(m - 1);
        if ((first >> 32) == (last >> 32)) { /* common case: the high word is constant */
            const uint32_t lo0 = (uint32_t)first;
            const uint32_t hi_part = (uint32_t)(first >> 32) * 0x85EBCA6Bu + k1;
            for (int j = 0; j < m; j++) {
                uint32_t h = fmix32((lo0 + (uint32_t)j) * 0x9E3779B1u + k0);
                h = fmix32(h ^ hi_part);
                t[j] = hash_uniform(h) < p ? t[j] : 0.0f;
            }
        } else {
            for (int j = 0; j < m; j++) t[j] = hash_uniform(hash_index(first + (uint64_t)j, k0, k1)) < p ? t[j] : 0.0f;
        }
        break;
    }
    default: /* KEEP_ALL */
        break;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The fused merge                                                                            */

TM_HOT int64_t tm_count_nonfinite_range(const void *p, int32_t dtype, int64_t start, int64_t end);

/* acc = fma(t, w, acc): one rounding per element */
TM_FMA_CLONES static void fma_accumulate(float *restrict acc, const float *restrict t, float w, int m) {
    for (int j = 0; j < m; j++) acc[j] = fmaf(t[j], w, acc[j]);
}

/*
 * True when a NaN/Inf in any input the merge reads always makes its output entry NaN/Inf: no
 * keep rule can drop the entry and no sign election can outvote it (NaN propagates, and an Inf τ
 * gives Inf or NaN through every weight, rescale and divisor, 0 included). The output's own
 * count then doubles as the input audit: zero means the inputs were finite, nonzero sends the
 * caller to the exact per-model check (which also tells an overflowed result from a bad input).
 */
static int output_reveals_inputs(const tm_args *a) {
    if (a->election != ELECT_NONE || !a->nonfinite) return 0;
    for (int i = 0; i < a->n_experts; i++)
        if (a->keep_mode[i] != KEEP_ALL && a->keep_mode[i] != KEEP_NONE) return 0;
    return 1;
}

/* Returns the number of NaN/Inf entries written (counted while the block is in L1); adds to
   *bad_in the input count of tm_args.input_nonfinite when that is set. */
TM_HOT int64_t tm_merge_range(const tm_args *a, int64_t start, int64_t end, int64_t *budget, float wsum, float *scratch,
                              int64_t *bad_in) {
    const int n = a->n_experts;
    float *restrict b = scratch;
    float *restrict acc = b + TM_BLOCK;
    float *restrict div = acc + TM_BLOCK;
    float *restrict total = div + TM_BLOCK;
    float *restrict taus = total + TM_BLOCK;
    const int need_base = a->subtract_base || a->add_base;
    const int audit_by_output = a->input_nonfinite != NULL && output_reveals_inputs(a);
    const int audit = a->input_nonfinite != NULL && !audit_by_output;
    int64_t bad = 0, in_bad = 0;

    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        if (need_base) {
            load_block(a->base, a->base_dtype, s, m, b);
            if (audit) in_bad += block_nonfinite(b, m);
        }

        /* wᵢ·rescale(mask(τᵢ)), in the reference's order of float32 operations */
        for (int i = 0; i < n; i++) {
            if (a->keep_mode[i] == KEEP_NONE) continue;
            float *restrict t = taus + (size_t)i * TM_BLOCK;
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            /* a NaN/Inf expert entry always gives a NaN/Inf τ (the base is counted above) */
            if (audit) in_bad += block_nonfinite(t, m);
            apply_keep(a, i, a->offset + s, m, &budget[i], t);
            const float r = a->rescale_value[i], w = a->weight[i];
            if (a->rescale_mode[i] == RESCALE_DIVIDE)
                for (int j = 0; j < m; j++) t[j] = t[j] / r;
            else if (a->rescale_mode[i] == RESCALE_MULTIPLY)
                for (int j = 0; j < m; j++) t[j] = t[j] * r;
            if (a->subtract_base) /* linear multiplies inside its fused multiply-add below */
                for (int j = 0; j < m; j++) t[j] = t[j] * w;
        }

        for (int j = 0; j < m; j++) acc[j] = 0.0f;
        if (a->election != ELECT_NONE) {
            for (int j = 0; j < m; j++) total[j] = 0.0f;
            for (int i = 0; i < n; i++) {
                if (a->keep_mode[i] == KEEP_NONE) continue; /* adds ±0: no effect */
                const float *restrict t = taus + (size_t)i * TM_BLOCK;
                if (a->election == ELECT_SUM)
                    for (int j = 0; j < m; j++) total[j] += t[j];
                else
                    for (int j = 0; j < m; j++) total[j] += (float)((t[j] > 0.0f) - (t[j] < 0.0f));
            }
            /* agreeing entries: sign(wτ) equals the elected sign (+1 where total >= 0) */
            for (int j = 0; j < m; j++) div[j] = 0.0f;
            for (int i = 0; i < n; i++) {
                if (a->keep_mode[i] == KEEP_NONE) continue; /* sign 0 never agrees */
                const float *restrict t = taus + (size_t)i * TM_BLOCK;
                const float w = a->divide == DIV_COUNT ? 1.0f : a->weight[i];
                for (int j = 0; j < m; j++) {
                    const float v = t[j];
                    const int agree = total[j] >= 0.0f ? v > 0.0f : v < 0.0f;
                    acc[j] += agree ? v : 0.0f;
                    div[j] += agree ? w : 0.0f;
                }
            }
            if (a->divide == DIV_WEIGHT || a->divide == DIV_COUNT)
                for (int j = 0; j < m; j++) acc[j] = acc[j] / (div[j] == 0.0f ? 1.0f : div[j]);
        } else if (!a->subtract_base) { /* linear: acc = fma(eᵢ, wᵢ, acc), one rounding per expert */
            for (int i = 0; i < n; i++) {
                if (a->keep_mode[i] == KEEP_NONE) continue;
                const float *restrict t = taus + (size_t)i * TM_BLOCK;
                fma_accumulate(acc, t, a->weight[i], m);
            }
            if (a->divide == DIV_CONSTANT) {
                const float d = a->divide_constant;
                for (int j = 0; j < m; j++) acc[j] = acc[j] / d;
            }
        } else {
            for (int i = 0; i < n; i++) {
                if (a->keep_mode[i] == KEEP_NONE) continue;
                const float *restrict t = taus + (size_t)i * TM_BLOCK;
                for (int j = 0; j < m; j++) acc[j] += t[j];
            }
            if (a->divide == DIV_WEIGHT) { /* Σw over every expert, float32, in order */
                const float d = fabsf(wsum) < 1e-8f ? 1.0f : wsum;
                for (int j = 0; j < m; j++) acc[j] = acc[j] / d;
            } else if (a->divide == DIV_COUNT) {
                for (int j = 0; j < m; j++) div[j] = 0.0f;
                for (int i = 0; i < n; i++) {
                    if (a->keep_mode[i] == KEEP_NONE) continue;
                    const float *restrict t = taus + (size_t)i * TM_BLOCK;
                    for (int j = 0; j < m; j++) div[j] += t[j] != 0.0f ? 1.0f : 0.0f;
                }
                for (int j = 0; j < m; j++) acc[j] = acc[j] / (div[j] == 0.0f ? 1.0f : div[j]);
            } else if (a->divide == DIV_CONSTANT) {
                const float d = a->divide_constant;
                for (int j = 0; j < m; j++) acc[j] = acc[j] / d;
            }
        }
        if (a->add_base) {
            const float lam = a->lambda;
            for (int j = 0; j < m; j++) acc[j] = b[j] + lam * acc[j];
        }
        store_block(a->out, a->out_dtype, s, m, acc);
        if (a->nonfinite) {
            const int64_t written = tm_count_nonfinite_range(a->out, a->out_dtype, s, s + m);
            bad += written;
            if (audit_by_output) in_bad += written;
        }
    }
    *bad_in += in_bad;
    return bad;
}

/* Entries with |τ| == threshold per expert in `which`, in [start, end). */
TM_HOT void tm_count_ties_range(const tm_args *a, int64_t start, int64_t end, uint32_t which, float *scratch,
                                int64_t *counts) {
    float *b = scratch, *t = scratch + TM_BLOCK;
    for (int i = 0; i < a->n_experts; i++) counts[i] = 0;
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        if (a->subtract_base) load_block(a->base, a->base_dtype, s, m, b);
        for (int i = 0; i < a->n_experts; i++) {
            if (!((which >> i) & 1u)) continue;
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            const float thr = a->threshold[i];
            int64_t c = 0;
            for (int j = 0; j < m; j++) c += fabsf(t[j]) == thr;
            counts[i] += c;
        }
    }
}

/*
 * Per (segment, expert) how many entries equal to the threshold the segment keeps, -1 for all:
 * the `need` lowest-index ties of the tensor, split over segments in flat order. The counts per
 * segment come from tm_topk_select (a->seg_ties) or, without them, from one more read.
 */
static int segment_budgets(const tm_args *a, int32_t segments, int64_t *budgets) {
    const int n = a->n_experts;
    uint32_t partial = 0;
    for (int i = 0; i < n; i++)
        if (a->keep_mode[i] == KEEP_TOPK && a->need[i] > 0 && a->need[i] < a->tied[i]) partial |= 1u << i;
    for (size_t q = 0; q < (size_t)segments * n; q++) budgets[q] = -1;
    if (!partial) {
        for (int i = 0; i < n; i++)
            if (a->keep_mode[i] == KEEP_TOPK && a->need[i] <= 0)
                for (int32_t s = 0; s < segments; s++) budgets[(size_t)s * n + i] = 0;
        return TM_OK;
    }
    int64_t *ties = malloc((size_t)segments * n * sizeof(int64_t));
    if (!ties) return TM_ENOMEM;
    int failed = 0;
    if (a->seg_ties) {
        memcpy(ties, a->seg_ties, (size_t)segments * n * sizeof(int64_t));
    } else {
#pragma omp parallel num_threads(thread_count(a, segments))
        {
            float *scratch = malloc(scratch_floats() * sizeof(float));
            if (!scratch) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int32_t s = 0; s < segments; s++) {
                if (!scratch) continue;
                int64_t start, end;
                segment_range(a->numel, segments, s, &start, &end);
                tm_count_ties_range(a, start, end, partial, scratch, ties + (size_t)s * n);
            }
            free(scratch);
        }
    }
    for (int i = 0; i < n && !failed; i++) {
        if (a->keep_mode[i] != KEEP_TOPK) continue;
        int64_t left = a->need[i] > 0 ? a->need[i] : 0;
        for (int32_t s = 0; s < segments; s++) {
            if (!((partial >> i) & 1u)) {
                budgets[(size_t)s * n + i] = left > 0 ? -1 : 0;
                continue;
            }
            int64_t here = ties[(size_t)s * n + i];
            int64_t take = here < left ? here : left;
            left -= take;
            budgets[(size_t)s * n + i] = take == here ? -1 : take;
        }
    }
    free(ties);
    return failed ? TM_ENOMEM : TM_OK;
}

/*
 * out = base + λ · combine(wᵢ · rescale(mask(τᵢ))) in one pass over base and the experts.
 * Exact top-k experts (KEEP_TOPK) need threshold/need/tied (and ideally seg_ties) from
 * tm_topk_select, called with the same numel and n_threads.
 */
int tm_merge(const tm_args *a) {
    int rc = check_args(a);
    if (rc) return rc;
    if (!valid_dtype(a->out_dtype)) return TM_EINVAL;
    if (a->numel == 0) return TM_OK;
    const int n = a->n_experts;
    const int32_t segments = tm_segment_count(a->numel, a->n_threads);
    if (a->seg_ties && a->n_segments != segments) return TM_EINVAL;
    int64_t *budgets = malloc((size_t)segments * (n > 0 ? n : 1) * sizeof(int64_t));
    if (!budgets) return TM_ENOMEM;
    rc = segment_budgets(a, segments, budgets);
    if (rc) {
        free(budgets);
        return rc;
    }
    float wsum = 0.0f; /* the reference's `divisor += w`, one expert at a time in float32 */
    for (int i = 0; i < n; i++) wsum += a->weight[i];
    int failed = 0;
#pragma omp parallel num_threads(thread_count(a, segments))
    {
        float *scratch = malloc(scratch_floats() * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int32_t s = 0; s < segments; s++) {
            if (!scratch) continue;
            int64_t start, end;
            segment_range(a->numel, segments, s, &start, &end);
            int64_t bad_in = 0;
            const int64_t bad = tm_merge_range(a, start, end, budgets + (size_t)s * n, wsum, scratch, &bad_in);
            if (a->nonfinite && bad) {
#pragma omp atomic
                *a->nonfinite += bad;
            }
            if (a->input_nonfinite && bad_in) {
#pragma omp atomic
                *a->input_nonfinite += bad_in;
            }
        }
        free(scratch);
    }
    free(budgets);
    return failed ? TM_ENOMEM : TM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* L1 norms for rescale="l1": Σ|τᵢ| and Σ|kept τᵢ| per expert, in float64                      */

TM_HOT void tm_abs_sums_range(const tm_args *a, int64_t start, int64_t end, float *scratch, double *sums) {
    const int n = a->n_experts;
    float *b = scratch, *t = scratch + TM_BLOCK, *kept = scratch + 2 * TM_BLOCK;
    for (int i = 0; i < 2 * n; i++) sums[i] = 0.0;
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        if (a->subtract_base) load_block(a->base, a->base_dtype, s, m, b);
        for (int i = 0; i < n; i++) {
            if (a->keep_mode[i] == KEEP_NONE) continue;
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, a->subtract_base, t);
            memcpy(kept, t, (size_t)m * sizeof(float));
            /* KEEP_TOPK: strictly greater here; tm_abs_sums adds need·threshold for the ties */
            int64_t budget = a->keep_mode[i] == KEEP_TOPK ? 0 : -1;
            apply_keep(a, i, a->offset + s, m, &budget, kept);
            double before = 0.0, after = 0.0;
            for (int j = 0; j < m; j++) {
                before += fabs((double)t[j]);
                after += fabs((double)kept[j]);
            }
            sums[2 * i] += before;
            sums[2 * i + 1] += after;
        }
    }
}

/* before[i] = Σ|τᵢ|, after[i] = Σ|τᵢ| over kept entries; summed per chunk, then chunks in order
   (the same result for any thread count). */
int tm_abs_sums(const tm_args *a, double *before, double *after) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    for (int i = 0; i < n; i++) before[i] = after[i] = 0.0;
    if (a->numel == 0) return TM_OK;
    const int64_t chunks = (a->numel + TM_CHUNK - 1) / TM_CHUNK;
    double *sums = malloc((size_t)chunks * 2 * (n > 0 ? n : 1) * sizeof(double));
    if (!sums) return TM_ENOMEM;
    int failed = 0;
    int nt = a->n_threads > 0 ? a->n_threads : 1;
    if (nt > chunks) nt = (int)chunks;
#pragma omp parallel num_threads(nt)
    {
        float *scratch = malloc(scratch_floats() * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++) {
            if (!scratch) continue;
            int64_t start = c * TM_CHUNK, end = start + TM_CHUNK < a->numel ? start + TM_CHUNK : a->numel;
            tm_abs_sums_range(a, start, end, scratch, sums + c * 2 * n);
        }
        free(scratch);
    }
    if (!failed)
        for (int64_t c = 0; c < chunks; c++)
            for (int i = 0; i < n; i++) {
                before[i] += sums[c * 2 * n + 2 * i];
                after[i] += sums[c * 2 * n + 2 * i + 1];
            }
    for (int i = 0; i < n; i++)
        if (a->keep_mode[i] == KEEP_TOPK && a->need[i] > 0) after[i] += (double)a->need[i] * (double)a->threshold[i];
    free(sums);
    return failed ? TM_ENOMEM : TM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* TADrop's sign_agreement: per expert, how many entries of its top-k (kept as tm_merge keeps   */
/* them, ties at the threshold by lowest flat index) agree in sign with the sum of the other    */
/* experts' τ; τ in float32 as load_tau forms it, the sums in float64 in expert order           */

#ifdef TM_AVX512_SCAN
/* 16 entries of a float32/bfloat16/float16 array as float32 (lanes outside `live` are 0),
   exactly as load_block converts them. */
__attribute__((target("avx512f"))) static inline __m512 load16_avx512(const void *src, int dtype, int64_t at,
                                                                       __mmask16 live) {
    if (dtype == TM_F32) return _mm512_maskz_loadu_ps(live, (const float *)src + at);
    const uint16_t *p = (const uint16_t *)src + at;
    __m256i raw;
    if (live == (__mmask16)0xFFFF) {
        raw = _mm256_loadu_si256((const __m256i *)p);
    } else { /* a segment's last entries: no read past them */
        uint16_t tail[16] = {0};
        for (int j = 0; j < 16; j++)
            if ((live >> j) & 1u) tail[j] = p[j];
        raw = _mm256_loadu_si256((const __m256i *)tail);
    }
    if (dtype == TM_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    return _mm512_cvtph_ps(raw);
}

/*
 * τ of 16 entries for every expert, as load_tau forms it, into tau (and widened to float64 in
 * wide_lo / wide_hi), their float64 sum in expert order into total_lo / total_hi, the non-zero
 * entries added to nonzero[i]; with audit, returns the entries (of `live`) whose sum is NaN/Inf.
 */
__attribute__((target("avx512f"), always_inline)) static inline unsigned taus16_avx512(
    const tm_args *a, int64_t at, __mmask16 live, __m512 *restrict tau, __m512d *restrict wide_lo,
    __m512d *restrict wide_hi, __m512d *total_lo, __m512d *total_hi, int64_t *restrict nonzero, int audit) {
    const __m512i exponent64 = _mm512_set1_epi64(0x7FF0000000000000LL);
    const __m512 b = load16_avx512(a->base, a->base_dtype, at, live);
    __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
    for (int i = 0; i < a->n_experts; i++) {
        const __m512 t = _mm512_sub_ps(load16_avx512(a->experts[i], a->expert_dtype[i], at, live), b);
        tau[i] = t;
        wide_lo[i] = _mm512_cvtps_pd(_mm512_castps512_ps256(t));
        wide_hi[i] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
        lo = _mm512_add_pd(lo, wide_lo[i]);
        hi = _mm512_add_pd(hi, wide_hi[i]);
        nonzero[i] += __builtin_popcount((unsigned)_mm512_mask_cmp_ps_mask(live, t, _mm512_setzero_ps(), _CMP_NEQ_UQ));
    }
    *total_lo = lo;
    *total_hi = hi;
    if (!audit) return 0;
    const unsigned bad_lo = _mm512_cmpeq_epi64_mask(_mm512_and_epi64(_mm512_castpd_si512(lo), exponent64), exponent64);
    const unsigned bad_hi = _mm512_cmpeq_epi64_mask(_mm512_and_epi64(_mm512_castpd_si512(hi), exponent64), exponent64);
    return (unsigned)__builtin_popcount((bad_lo | (bad_hi << 8)) & live);
}

/* Where mine and others = total − mine have the same sign: mine · others > 0 (see
   sign_agreement_range_avx512). */
__attribute__((target("avx512f"), always_inline)) static inline __mmask16 agrees16_avx512(__m512d total_lo, __m512d total_hi,
                                                                                        __m512d mine_lo, __m512d mine_hi) {
    const __m512d sign_lo = _mm512_mul_pd(mine_lo, _mm512_sub_pd(total_lo, mine_lo));
    const __m512d sign_hi = _mm512_mul_pd(mine_hi, _mm512_sub_pd(total_hi, mine_hi));
    return _mm512_kunpackb(_mm512_cmp_pd_mask(sign_hi, _mm512_setzero_pd(), _CMP_GT_OQ),
                           _mm512_cmp_pd_mask(sign_lo, _mm512_setzero_pd(), _CMP_GT_OQ));
}

/*
 * tm_sign_agreement_range with AVX-512, 16 entries at a time straight from the inputs: τ as
 * load_tau forms it, the float64 sum in expert order, the keep rule as apply_keep applies it
 * (ties consumed from the segment's budget in flat order) and others = total − mine from the
 * same subtraction, so the counts are the portable loop's. The signs agree where the float64
 * product mine · others is > 0: each factor is 0 or at least 2^-149 in size (τ and the sums are
 * multiples of it, and far below 2^512), so the product neither underflows nor overflows, and a NaN
 * compares false. The portable loop spends most of its time copying τ, zeroing what the rule
 * drops and widening it again; this one keeps masks.
 */
__attribute__((target("avx512f"))) static void sign_agreement_range_avx512(const tm_args *a, int64_t start, int64_t end,
                                                                             int64_t *restrict budget, int64_t *restrict counts) {
    const int n = a->n_experts, audit = a->input_nonfinite != NULL;
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    int64_t agree[TM_MAX_EXPERTS] = {0}, nonzero[TM_MAX_EXPERTS] = {0}, bad = 0;
    __m512 tau[TM_MAX_EXPERTS];
    __m512d wide_lo[TM_MAX_EXPERTS], wide_hi[TM_MAX_EXPERTS];
    __mmask16 every_tie[TM_MAX_EXPERTS]; /* the segment keeps all its ties (budget -1) */
    for (int i = 0; i < n; i++) every_tie[i] = budget[i] < 0 ? (__mmask16)0xFFFF : (__mmask16)0;
    for (int64_t j = start; j < end; j += 16) {
        const __mmask16 live = end - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - j)) - 1u);
        __m512d total_lo, total_hi;
        bad += taus16_avx512(a, j, live, tau, wide_lo, wide_hi, &total_lo, &total_hi, nonzero, audit);
        for (int i = 0; i < n; i++) {
            const __m512 t = tau[i];
            __mmask16 keep = live;
            if (a->keep_mode[i] == KEEP_TOPK) {
                const __m512 size = _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(t), magnitude));
                const __m512 thr = _mm512_set1_ps(a->threshold[i]);
                const __mmask16 tie = _mm512_mask_cmp_ps_mask(live, size, thr, _CMP_EQ_OQ);
                keep = _mm512_kor(_mm512_mask_cmp_ps_mask(live, size, thr, _CMP_GT_OQ), _mm512_kand(tie, every_tie[i]));
                if (__builtin_expect(budget[i] > 0, 0)) { /* the partial segment: lowest flat index first */
                    unsigned left = tie;
                    for (; left && budget[i] > 0; budget[i]--) {
                        keep = _mm512_kor(keep, (__mmask16)(left & (0u - left)));
                        left &= left - 1;
                    }
                    if (budget[i] == 0) every_tie[i] = 0;
                }
            }
            const __mmask16 agrees = agrees16_avx512(total_lo, total_hi, wide_lo[i], wide_hi[i]);
            agree[i] += __builtin_popcount((unsigned)_mm512_kand(keep, agrees));
        }
    }
    for (int i = 0; i < n; i++) {
        counts[2 * i] = agree[i];
        counts[2 * i + 1] = nonzero[i];
    }
    counts[2 * n] = bad;
}
#endif

TM_HOT void tm_sign_agreement_range(const tm_args *a, int64_t start, int64_t end, const int64_t *budgets_in,
                                    float *scratch, double *total, int64_t *counts) {
    const int n = a->n_experts;
    float *b = scratch, *kept = scratch + TM_BLOCK, *taus = scratch + 2 * TM_BLOCK;
    int64_t budget[TM_MAX_EXPERTS];
    for (int i = 0; i < n; i++) {
        budget[i] = budgets_in[i];
        counts[2 * i] = counts[2 * i + 1] = 0;
    }
    counts[2 * n] = 0;
#ifdef TM_AVX512_SCAN
    if (have_avx512()) {
        sign_agreement_range_avx512(a, start, end, budget, counts);
        return;
    }
#endif
    const int audit = a->input_nonfinite != NULL;
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        load_block(a->base, a->base_dtype, s, m, b);
        for (int j = 0; j < m; j++) total[j] = 0.0;
        for (int i = 0; i < n; i++) {
            float *t = taus + (size_t)i * TM_BLOCK;
            load_tau(a->experts[i], a->expert_dtype[i], s, m, b, 1, t);
            int64_t nonzero = 0;
            for (int j = 0; j < m; j++) {
                total[j] += (double)t[j];
                nonzero += t[j] != 0.0f;
            }
            counts[2 * i + 1] += nonzero;
        }
        /* a NaN/Inf input makes its τ, and so the float64 sum, NaN/Inf */
        if (audit) counts[2 * n] += block_nonfinite_f64(total, m);
        for (int i = 0; i < n; i++) {
            memcpy(kept, taus + (size_t)i * TM_BLOCK, (size_t)m * sizeof(float));
            apply_keep(a, i, a->offset + s, m, &budget[i], kept);
            int64_t agree = 0;
            for (int j = 0; j < m; j++) {
                const double mine = (double)kept[j], others = total[j] - mine;
                agree += (mine > 0.0 && others > 0.0) || (mine < 0.0 && others < 0.0);
            }
            counts[2 * i] += agree;
        }
    }
}

/* agree[i]: entries of expert i's kept set (KEEP_TOPK from tm_topk_select, or KEEP_ALL) whose
   sign agrees with Σₗ≠ᵢ τₗ there; nonzero[i]: entries where τᵢ != 0. Integer counts: the same
   for any thread count. With tm_args.input_nonfinite set it also counts the entries where an
   input (or an overflowed τ) is NaN/Inf. */
int tm_sign_agreement(const tm_args *a, int64_t *agree, int64_t *nonzero) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    for (int i = 0; i < n; i++) {
        if (a->keep_mode[i] != KEEP_TOPK && a->keep_mode[i] != KEEP_ALL) return TM_EINVAL;
        agree[i] = nonzero[i] = 0;
    }
    if (a->numel == 0 || n == 0) return TM_OK;
    if (!a->subtract_base || !valid_dtype(a->base_dtype)) return TM_EINVAL;
    const int32_t segments = tm_segment_count(a->numel, a->n_threads);
    if (a->seg_ties && a->n_segments != segments) return TM_EINVAL;
    int64_t *budgets = malloc((size_t)segments * n * sizeof(int64_t));
    int64_t *counts = calloc((size_t)segments * (2 * n + 1), sizeof(int64_t));
    if (!budgets || !counts) {
        free(budgets);
        free(counts);
        return TM_ENOMEM;
    }
    rc = segment_budgets(a, segments, budgets);
    int failed = rc != TM_OK;
    if (!failed) {
#pragma omp parallel num_threads(thread_count(a, segments))
        {
            float *scratch = malloc(scratch_floats() * sizeof(float));
            double *total = malloc(TM_BLOCK * sizeof(double));
            if (!scratch || !total) {
#pragma omp atomic write
                failed = 1;
            }
#pragma omp for schedule(dynamic, 1)
            for (int32_t s = 0; s < segments; s++) {
                if (!scratch || !total) continue;
                int64_t start, end;
                segment_range(a->numel, segments, s, &start, &end);
                tm_sign_agreement_range(a, start, end, budgets + (size_t)s * n, scratch, total, counts + (size_t)s * (2 * n + 1));
            }
            free(scratch);
            free(total);
        }
    }
    if (!failed)
        for (int32_t s = 0; s < segments; s++) {
            const int64_t *c = counts + (size_t)s * (2 * n + 1);
            for (int i = 0; i < n; i++) {
                agree[i] += c[2 * i];
                nonzero[i] += c[2 * i + 1];
            }
            if (a->input_nonfinite) *a->input_nonfinite += c[2 * n];
        }
    free(budgets);
    free(counts);
    return failed ? (rc != TM_OK ? rc : TM_ENOMEM) : TM_OK;
}

/*
 * The same counts in one read where it can: TADrop asks for the agreement of each expert's top-k
 * at the asked density, which tm_topk_select then tm_sign_agreement find in two reads, each
 * bound by compute. Here the sample bracket's pass also forms the agreement flags (AVX-512, as
 * sign_agreement_range_avx512): entries above an expert's bracket are kept whatever the
 * threshold turns out to be, so their agreements are counted on the spot; the bracket's
 * candidates are stored with their flag in bit 31 (|τ| bits never set it). Once the bracket
 * resolves the threshold, the flags of the candidates it keeps (greater, then the first `need`
 * ties in flat order, as apply_keep keeps them) are added. Where that cannot work (no AVX-512,
 * a small tensor, a bracket that misses or overflows its buffers) the two reads run instead.
 */
#ifdef TM_AVX512_SCAN
__attribute__((target("avx512f"))) static void sign_agreement_bracket_range_avx512(
    const tm_args *a, int64_t start, int64_t end, const tm_bracket *br, tm_bucket *buckets, uint32_t *restrict runs,
    int64_t *restrict counts) {
    const int n = a->n_experts, audit = a->input_nonfinite != NULL;
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), flag = _mm512_set1_epi32((int)0x80000000u);
    int64_t agree[TM_MAX_EXPERTS] = {0}, nonzero[TM_MAX_EXPERTS] = {0}, bad = 0;
    __m512 tau[TM_MAX_EXPERTS];
    __m512d wide_lo[TM_MAX_EXPERTS], wide_hi[TM_MAX_EXPERTS];
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        int found[TM_MAX_EXPERTS] = {0};
        uint32_t above[TM_MAX_EXPERTS] = {0};
        for (int j = 0; j < m; j += 16) {
            const __mmask16 live = m - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - j)) - 1u);
            __m512d total_lo, total_hi;
            bad += taus16_avx512(a, s + j, live, tau, wide_lo, wide_hi, &total_lo, &total_hi, nonzero, audit);
            for (int i = 0; i < n; i++) {
                const __m512 t = tau[i];
                const __mmask16 agrees = _mm512_kand(live, agrees16_avx512(total_lo, total_hi, wide_lo[i], wide_hi[i]));
                if (a->keep_mode[i] != KEEP_TOPK) { /* KEEP_ALL */
                    agree[i] += __builtin_popcount((unsigned)agrees);
                    continue;
                }
                const __m512i v = _mm512_and_si512(_mm512_castps_si512(t), magnitude);
                const __mmask16 over = _mm512_mask_cmpgt_epu32_mask(live, v, _mm512_set1_epi32((int)br[i].hi));
                const __mmask16 inside = _mm512_mask_cmple_epu32_mask(
                    live, _mm512_sub_epi32(v, _mm512_set1_epi32((int)br[i].lo)), _mm512_set1_epi32((int)(br[i].hi - br[i].lo)));
                above[i] += (uint32_t)__builtin_popcount((unsigned)over);
                agree[i] += __builtin_popcount((unsigned)_mm512_kand(over, agrees));
                uint32_t *u = runs + (size_t)i * (TM_BLOCK + 16);
                _mm512_storeu_si512((void *)(u + found[i]),
                                    _mm512_maskz_compress_epi32(inside, _mm512_mask_or_epi32(v, agrees, v, flag)));
                found[i] += __builtin_popcount((unsigned)inside);
            }
        }
        for (int i = 0; i < n; i++) {
            if (a->keep_mode[i] != KEEP_TOPK) continue;
            tm_bucket *bk = &buckets[i];
            const uint32_t *u = runs + (size_t)i * (TM_BLOCK + 16);
            const uint32_t l = br[i].lo;
            const int32_t shift = br[i].shift;
            bk->above += above[i];
            uint32_t *restrict hist = bk->hist;
            for (int q = 0; q < found[i]; q++) hist[((u[q] & 0x7FFFFFFFu) - l) >> shift]++;
            const int64_t room = bk->cap - bk->count;
            if (room > 0) memcpy(bk->buf + bk->count, u, (size_t)(found[i] < room ? found[i] : room) * sizeof(uint32_t));
            bk->count += found[i];
        }
    }
    for (int i = 0; i < n; i++) {
        counts[2 * i] = agree[i];
        counts[2 * i + 1] = nonzero[i];
    }
    counts[2 * n] = bad;
}
#endif

/* The two reads: tm_topk_select, then tm_sign_agreement with its thresholds. */
static int sign_agreement_two_reads(const tm_args *a_in, const int64_t *k, uint32_t flags, int64_t *agree,
                                    int64_t *nonzero) {
    tm_args a = *a_in;
    const int n = a.n_experts;
    uint32_t which = 0;
    for (int i = 0; i < n; i++)
        if (a.keep_mode[i] == KEEP_TOPK) which |= 1u << i;
    const int32_t segments = tm_segment_count(a.numel, a.n_threads);
    int64_t *seg_ties = calloc((size_t)segments * n, sizeof(int64_t));
    if (!seg_ties) return TM_ENOMEM;
    float thr[TM_MAX_EXPERTS] = {0};
    int64_t greater[TM_MAX_EXPERTS] = {0}, tied[TM_MAX_EXPERTS] = {0};
    int rc = which ? tm_topk_select(&a, which, k, thr, greater, tied, seg_ties, flags, NULL) : TM_OK;
    if (rc == TM_OK) {
        for (int i = 0; i < n; i++)
            if ((which >> i) & 1u) {
                a.threshold[i] = thr[i];
                a.need[i] = k[i] - greater[i];
                a.tied[i] = tied[i];
            }
        a.seg_ties = seg_ties;
        a.n_segments = segments;
        rc = tm_sign_agreement(&a, agree, nonzero);
    }
    free(seg_ties);
    return rc;
}

/*
 * agree[i], nonzero[i] as tm_sign_agreement for the top-k[i] of each KEEP_TOPK expert (KEEP_ALL:
 * every entry); *reads gets 1 when one read sufficed, 2 otherwise. flags are TM_SELECT_* (tests).
 */
int tm_sign_agreement_topk(const tm_args *a, const int64_t *k, uint32_t flags, int64_t *agree, int64_t *nonzero,
                           int32_t *reads) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    *reads = 2;
    for (int i = 0; i < n; i++) {
        if (a->keep_mode[i] != KEEP_TOPK && a->keep_mode[i] != KEEP_ALL) return TM_EINVAL;
        if (a->keep_mode[i] == KEEP_TOPK && (k[i] < 1 || k[i] > a->numel)) return TM_ERANGE;
        agree[i] = nonzero[i] = 0;
    }
    if (a->numel == 0 || n == 0) return TM_OK;
    if (!a->subtract_base || !valid_dtype(a->base_dtype)) return TM_EINVAL;
#ifdef TM_AVX512_SCAN
    const int64_t numel = a->numel;
    const int32_t segments = tm_segment_count(numel, a->n_threads);
    int sel[TM_MAX_EXPERTS], ns = 0;
    for (int i = 0; i < n; i++)
        if (a->keep_mode[i] == KEEP_TOPK) sel[ns++] = i;
    if (!have_avx512() || (flags & TM_SELECT_NO_SAMPLE) || (segments == 1 && numel <= TM_SMALL_SELECT))
        return sign_agreement_two_reads(a, k, flags, agree, nonzero);
    tm_bracket br[TM_MAX_EXPERTS];
    int64_t expected[TM_MAX_EXPERTS] = {0};
    rc = sample_brackets(a, sel, ns, k, flags, br, expected);
    if (rc) return rc;
    for (int q = 0; q < ns; q++) {
        const int i = sel[q];
        br[i].shift = bracket_shift(br[i].lo, br[i].hi);
        if (expected[i] >= numel / 2) /* a bracket too wide to buffer: the histograms' two reads */
            return sign_agreement_two_reads(a, k, flags, agree, nonzero);
    }
    tm_bucket *buckets = calloc((size_t)segments * n, sizeof(tm_bucket));
    int64_t *counts = calloc((size_t)segments * (2 * n + 1), sizeof(int64_t));
    int failed = !buckets || !counts;
    if (!failed) {
#pragma omp parallel num_threads(thread_count(a, segments))
        {
            uint32_t *runs = malloc((size_t)n * (TM_BLOCK + 16) * sizeof(uint32_t));
#pragma omp for schedule(dynamic, 1)
            for (int32_t s = 0; s < segments; s++) {
                tm_bucket *bk = buckets + (size_t)s * n;
                int ok = runs != NULL;
                for (int q = 0; q < ns && ok; q++) {
                    const int i = sel[q];
                    bk[i].cap = (flags & TM_SELECT_TINY) ? 64 : 2 * expected[i] / segments + 4096;
                    bk[i].buf = malloc((size_t)bk[i].cap * sizeof(uint32_t));
                    bk[i].hist = calloc(TM_BRACKET_BINS, sizeof(uint32_t));
                    ok = bk[i].buf && bk[i].hist;
                }
                if (!ok) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                int64_t start, end;
                segment_range(numel, segments, s, &start, &end);
                sign_agreement_bracket_range_avx512(a, start, end, br, bk, runs, counts + (size_t)s * (2 * n + 1));
            }
            free(runs);
        }
    }
    int resolved = !failed;
    float thr[TM_MAX_EXPERTS] = {0};
    int64_t greater[TM_MAX_EXPERTS] = {0}, tied[TM_MAX_EXPERTS] = {0};
    int64_t *seg_ties = resolved ? calloc((size_t)segments * n, sizeof(int64_t)) : NULL;
    int64_t *kept_agree = resolved ? calloc((size_t)segments * n, sizeof(int64_t)) : NULL;
    if (resolved && (!seg_ties || !kept_agree)) failed = 1, resolved = 0;
    for (int q = 0; q < ns && resolved; q++) {
        const int i = sel[q];
        int64_t above = 0, count = 0, overflow = 0;
        for (int32_t s = 0; s < segments; s++) {
            const tm_bucket *bk = &buckets[(size_t)s * n + i];
            above += bk->above;
            count += bk->count;
            overflow |= bk->count > bk->cap;
        }
        /* a missed bracket, or one whose candidates (and flags) did not all fit in the buffers */
        if (above >= k[i] || above + count < k[i] || overflow) {
            resolved = 0;
            break;
        }
        int narrow = 0, bin = -1;
        rc = resolve_bracket(n, i, segments, &br[i], buckets, k[i], thr, greater, tied, seg_ties, &narrow, &bin);
        if (rc == TM_ENOMEM) failed = 1;
        if (rc || narrow) resolved = 0;
    }
    if (resolved) {
        for (int32_t s = 0; s < segments; s++) {
            const int64_t *c = counts + (size_t)s * (2 * n + 1);
            for (int i = 0; i < n; i++) {
                agree[i] += c[2 * i];
                nonzero[i] += c[2 * i + 1];
            }
            if (a->input_nonfinite) *a->input_nonfinite += c[2 * n];
        }
        /* the ties each segment keeps (-1: all), the first `need` in flat order, as segment_budgets */
        for (int q = 0; q < ns; q++) {
            const int i = sel[q];
            int64_t left = k[i] - greater[i];
            for (int32_t s = 0; s < segments; s++) {
                int64_t *here = &seg_ties[(size_t)s * n + i];
                const int64_t take = *here < left ? *here : left;
                left -= take;
                *here = take == *here ? -1 : take;
            }
        }
        /* the flags of the kept candidates: above the threshold (as bits: a NaN's flag is 0),
           then the segment's ties in index order */
#pragma omp parallel for schedule(dynamic, 1) num_threads(thread_count(a, segments))
        for (int32_t s = 0; s < segments; s++)
            for (int q = 0; q < ns; q++) {
                const int i = sel[q];
                const tm_bucket *bk = &buckets[(size_t)s * n + i];
                const uint32_t t = float_to_bits(thr[i]), *restrict buf = bk->buf;
                int64_t take = seg_ties[(size_t)s * n + i];
                uint32_t count = 0; /* 32-bit lanes; a segment's candidates fit */
                if (take < 0)
                    for (int64_t j = 0; j < bk->count; j++) count += ((buf[j] & 0x7FFFFFFFu) >= t) & (buf[j] >> 31);
                else
                    for (int64_t j = 0; j < bk->count; j++) count += ((buf[j] & 0x7FFFFFFFu) > t) & (buf[j] >> 31);
                int64_t extra = 0;
                for (int64_t j = 0; j < bk->count && take > 0; j++)
                    if ((buf[j] & 0x7FFFFFFFu) == t) {
                        extra += buf[j] >> 31;
                        take--;
                    }
                kept_agree[(size_t)s * n + i] = (int64_t)count + extra;
            }
        for (int32_t s = 0; s < segments; s++)
            for (int q = 0; q < ns; q++) agree[sel[q]] += kept_agree[(size_t)s * n + sel[q]];
        *reads = 1;
    }
    free(seg_ties);
    free(kept_agree);
    if (buckets)
        for (size_t q = 0; q < (size_t)segments * n; q++) {
            free(buckets[q].buf);
            free(buckets[q].hist);
        }
    free(buckets);
    free(counts);
    if (failed) return TM_ENOMEM;
    if (!resolved) return sign_agreement_two_reads(a, k, flags, agree, nonzero);
    return TM_OK;
#else
    return sign_agreement_two_reads(a, k, flags, agree, nonzero);
#endif
}

/* LwPTV's sign_conflict: per expert, the entries where sign(τᵢ) opposes / agrees with the sign
   of Σₗ≠ᵢ τₗ; τ in float64 ((double)e − (double)b), the sum in float64 in expert order (the
   reference's order), a zero or NaN on either side counting as neither                      */

#ifdef TM_AVX512_SCAN
/*
 * tm_sign_counts_range with AVX-512, 16 entries at a time: τ = e − b in float64 (exact), the
 * sum in expert order, others = total − mine from the same subtraction, and the two signs
 * compared through the sign of mine · others (see sign_agreement_range_avx512).
 */
__attribute__((target("avx512f"))) static void sign_counts_range_avx512(const tm_args *a, int64_t start, int64_t end,
                                                                          int64_t *restrict counts) {
    const int n = a->n_experts, audit = a->input_nonfinite != NULL;
    const __m512i exponent64 = _mm512_set1_epi64(0x7FF0000000000000LL);
    const __m512d zerod = _mm512_setzero_pd();
    int64_t conflict[TM_MAX_EXPERTS] = {0}, agree[TM_MAX_EXPERTS] = {0}, bad = 0;
    __m512d wide_lo[TM_MAX_EXPERTS], wide_hi[TM_MAX_EXPERTS];
    for (int64_t j = start; j < end; j += 16) {
        const __mmask16 live = end - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - j)) - 1u);
        const __m512 b = load16_avx512(a->base, a->base_dtype, j, live);
        const __m512d b_lo = _mm512_cvtps_pd(_mm512_castps512_ps256(b));
        const __m512d b_hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
        __m512d total_lo = zerod, total_hi = zerod;
        for (int i = 0; i < n; i++) {
            const __m512 e = load16_avx512(a->experts[i], a->expert_dtype[i], j, live);
            wide_lo[i] = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)), b_lo);
            wide_hi[i] = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))), b_hi);
            total_lo = _mm512_add_pd(total_lo, wide_lo[i]);
            total_hi = _mm512_add_pd(total_hi, wide_hi[i]);
        }
        if (audit) {
            const unsigned bad_lo = _mm512_cmpeq_epi64_mask(_mm512_and_epi64(_mm512_castpd_si512(total_lo), exponent64), exponent64);
            const unsigned bad_hi = _mm512_cmpeq_epi64_mask(_mm512_and_epi64(_mm512_castpd_si512(total_hi), exponent64), exponent64);
            bad += __builtin_popcount((bad_lo | (bad_hi << 8)) & live);
        }
        for (int i = 0; i < n; i++) {
            const __m512d sign_lo = _mm512_mul_pd(wide_lo[i], _mm512_sub_pd(total_lo, wide_lo[i]));
            const __m512d sign_hi = _mm512_mul_pd(wide_hi[i], _mm512_sub_pd(total_hi, wide_hi[i]));
            const __mmask16 opposes = _mm512_kunpackb(_mm512_cmp_pd_mask(sign_hi, zerod, _CMP_LT_OQ),
                                                      _mm512_cmp_pd_mask(sign_lo, zerod, _CMP_LT_OQ));
            const __mmask16 agrees = _mm512_kunpackb(_mm512_cmp_pd_mask(sign_hi, zerod, _CMP_GT_OQ),
                                                     _mm512_cmp_pd_mask(sign_lo, zerod, _CMP_GT_OQ));
            conflict[i] += __builtin_popcount((unsigned)_mm512_kand(live, opposes));
            agree[i] += __builtin_popcount((unsigned)_mm512_kand(live, agrees));
        }
    }
    for (int i = 0; i < n; i++) {
        counts[2 * i] = conflict[i];
        counts[2 * i + 1] = agree[i];
    }
    counts[2 * n] = bad;
}
#endif

TM_HOT void tm_sign_counts_range(const tm_args *a, int64_t start, int64_t end, float *scratch, double *taus,
                                 int64_t *counts) {
    const int n = a->n_experts;
    float *b = scratch, *e = scratch + TM_BLOCK;
    double *total = taus + (size_t)n * TM_BLOCK;
    const int audit = a->input_nonfinite != NULL;
    for (int i = 0; i < 2 * n + 1; i++) counts[i] = 0;
#ifdef TM_AVX512_SCAN
    if (have_avx512()) {
        sign_counts_range_avx512(a, start, end, counts);
        return;
    }
#endif
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        load_block(a->base, a->base_dtype, s, m, b);
        for (int j = 0; j < m; j++) total[j] = 0.0;
        for (int i = 0; i < n; i++) {
            double *t = taus + (size_t)i * TM_BLOCK;
            load_block(a->experts[i], a->expert_dtype[i], s, m, e);
            for (int j = 0; j < m; j++) {
                t[j] = (double)e[j] - (double)b[j];
                total[j] += t[j];
            }
        }
        /* float64 cannot overflow here: the sum is NaN/Inf exactly where an input is */
        if (audit) counts[2 * n] += block_nonfinite_f64(total, m);
        for (int i = 0; i < n; i++) {
            const double *t = taus + (size_t)i * TM_BLOCK;
            int64_t conflict = 0, agree = 0; /* 64-bit: the same lane width as the doubles */
            for (int j = 0; j < m; j++) {
                const double mine = t[j], others = total[j] - mine;
                /* the sign product's sign without the product: a zero or NaN side is neither */
                const int64_t up = mine > 0.0, down = mine < 0.0, o_up = others > 0.0, o_down = others < 0.0;
                conflict += (up & o_down) | (down & o_up);
                agree += (up & o_up) | (down & o_down);
            }
            counts[2 * i] += conflict;
            counts[2 * i + 1] += agree;
        }
    }
}

/* conflict[i], agree[i] as above, over the whole tensor; integer counts, any thread count.
   With tm_args.input_nonfinite set it also counts the entries where an input is NaN/Inf. */
int tm_sign_counts(const tm_args *a, int64_t *conflict, int64_t *agree) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    for (int i = 0; i < n; i++) {
        if (a->keep_mode[i] == KEEP_NONE) return TM_EINVAL;
        conflict[i] = agree[i] = 0;
    }
    if (a->numel == 0 || n == 0) return TM_OK;
    if (!a->subtract_base || !valid_dtype(a->base_dtype)) return TM_EINVAL;
    const int32_t segments = tm_segment_count(a->numel, a->n_threads);
    int64_t *counts = calloc((size_t)segments * (2 * n + 1), sizeof(int64_t));
    if (!counts) return TM_ENOMEM;
    int failed = 0;
#pragma omp parallel num_threads(thread_count(a, segments))
    {
        float *scratch = malloc(scratch_floats() * sizeof(float));
        double *taus = malloc((size_t)(n + 1) * TM_BLOCK * sizeof(double));
        if (!scratch || !taus) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int32_t s = 0; s < segments; s++) {
            if (!scratch || !taus) continue;
            int64_t start, end;
            segment_range(a->numel, segments, s, &start, &end);
            tm_sign_counts_range(a, start, end, scratch, taus, counts + (size_t)s * (2 * n + 1));
        }
        free(scratch);
        free(taus);
    }
    if (!failed)
        for (int32_t s = 0; s < segments; s++) {
            const int64_t *c = counts + (size_t)s * (2 * n + 1);
            for (int i = 0; i < n; i++) {
                conflict[i] += c[2 * i];
                agree[i] += c[2 * i + 1];
            }
            if (a->input_nonfinite) *a->input_nonfinite += c[2 * n];
        }
    free(counts);
    return failed ? TM_ENOMEM : TM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Input validation: NaN/Inf count in one read (torch.isfinite(t).all() costs ~6 passes)       */

TM_HOT int64_t tm_count_nonfinite_range(const void *p, int32_t dtype, int64_t start, int64_t end) {
    uint32_t count = 0; /* callers pass at most a chunk; 32-bit lanes vectorise twice as wide as 64 */
    if (dtype == TM_F32) {
        const uint32_t *restrict x = (const uint32_t *)p;
        for (int64_t j = start; j < end; j++) count += (x[j] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *restrict x = (const uint16_t *)p;
        const uint16_t exponent = dtype == TM_BF16 ? 0x7F80u : 0x7C00u;
        for (int64_t j = start; j < end; j++) count += (x[j] & exponent) == exponent;
    }
    return count;
}

/* Number of NaN and ±Inf entries of a float32/bfloat16/float16 array; -1 for a bad dtype. */
int64_t tm_count_nonfinite(const void *p, int64_t numel, int32_t dtype, int32_t threads) {
    if (!valid_dtype(dtype) || numel < 0) return -1;
    const int64_t chunks = (numel + TM_CHUNK - 1) / TM_CHUNK;
    int nt = threads > 0 ? threads : 1;
    if (nt > chunks) nt = chunks > 0 ? (int)chunks : 1;
    int64_t count = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : count)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t start = c * TM_CHUNK, end = start + TM_CHUNK < numel ? start + TM_CHUNK : numel;
        count += tm_count_nonfinite_range(p, dtype, start, end);
    }
    return count;
}

/* ---------------------------------------------------------------------------------------- */
/* Task-vector statistics (ops/stats.task_vector_stats): one read of base + experts           */

#define TM_STAT_COLUMNS 7 /* count, Σx, Σx², Σ|x|, max|x|, Σx³, Σx⁴ */
#define TM_STAT_LANES 8   /* independent accumulators: a fixed summation order that vectorises */

/* Eight float64 lanes as a GCC vector: each lane accumulates every 8th entry, a fixed order
   that compiles to SIMD in every target clone (plain C loops over lanes did not vectorise). */
typedef double tm_v8d __attribute__((vector_size(64)));
typedef int64_t tm_v8i __attribute__((vector_size(64)));

/* The columns of x = (double)expert − (double)base (exact, as the reference's float64 τ) over
   [start, end), for every expert; the lanes are added in order at the end. */
TM_HOT void tm_tau_stats_range(const tm_args *a, int64_t start, int64_t end, float *scratch, double *out) {
    const int n = a->n_experts;
    float *b = scratch, *e = scratch + TM_BLOCK;
    double *x = (double *)(scratch + 2 * TM_BLOCK); /* TM_BLOCK doubles */
    const tm_v8i abs_mask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    for (int i = 0; i < n; i++) {
        tm_v8d s1 = {0}, s2 = {0}, sa = {0}, s3 = {0}, s4 = {0}, mx = {0};
        for (int64_t s = start; s < end; s += TM_BLOCK) {
            const int m = block_len(s, end);
            load_block(a->base, a->base_dtype, s, m, b); /* again per expert: a chunk stays in L2 */
            load_block(a->experts[i], a->expert_dtype[i], s, m, e);
            for (int j = 0; j < m; j++) x[j] = (double)e[j] - (double)b[j];
            const int m8 = (m + TM_STAT_LANES - 1) & ~(TM_STAT_LANES - 1);
            for (int j = m; j < m8; j++) x[j] = 0.0; /* zeros add nothing, and |0| never wins the max */
            for (int j0 = 0; j0 < m8; j0 += TM_STAT_LANES) {
                tm_v8d v, av, v2;
                memcpy(&v, x + j0, sizeof v);
                av = (tm_v8d)((tm_v8i)v & abs_mask);
                v2 = v * v;
                s1 += v;
                s2 += v2;
                sa += av;
                s3 += v2 * v;
                s4 += v2 * v2;
                const tm_v8i greater = av > mx;
                mx = (tm_v8d)(((tm_v8i)av & greater) | ((tm_v8i)mx & ~greater));
            }
        }
        double *o = out + (size_t)i * TM_STAT_COLUMNS;
        o[0] = (double)(end - start);
        o[1] = o[2] = o[3] = o[4] = o[5] = o[6] = 0.0;
        for (int l = 0; l < TM_STAT_LANES; l++) {
            o[1] += s1[l];
            o[2] += s2[l];
            o[3] += sa[l];
            o[4] = mx[l] > o[4] ? mx[l] : o[4];
            o[5] += s3[l];
            o[6] += s4[l];
        }
    }
}

/*
 * out: n_experts × 7 float64, the columns of ops/stats.STAT_COLUMNS for τᵢ = expertᵢ − base in
 * float64. Summed per chunk (8 lanes each), then chunks in order: the same result for any
 * thread count; it differs from torch's float64 sums only by summation order. max|x| is NaN
 * when τ has a NaN (as torch's max), 0 for an empty tensor.
 */
int tm_tau_stats(const tm_args *a, double *out) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    for (int i = 0; i < n; i++) {
        if (a->keep_mode[i] == KEEP_NONE || !valid_dtype(a->base_dtype)) return TM_EINVAL;
        for (int c = 0; c < TM_STAT_COLUMNS; c++) out[(size_t)i * TM_STAT_COLUMNS + c] = 0.0;
    }
    if (a->numel == 0 || n == 0) return TM_OK;
    const int64_t chunks = (a->numel + TM_CHUNK - 1) / TM_CHUNK;
    const size_t per_chunk = (size_t)n * TM_STAT_COLUMNS;
    double *partial = malloc((size_t)chunks * per_chunk * sizeof(double));
    if (!partial) return TM_ENOMEM;
    int failed = 0;
    int nt = a->n_threads > 0 ? a->n_threads : 1;
    if (nt > chunks) nt = (int)chunks;
#pragma omp parallel num_threads(nt)
    {
        float *scratch = malloc(scratch_floats() * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t c = 0; c < chunks; c++) {
            if (!scratch) continue;
            const int64_t start = c * TM_CHUNK, end = start + TM_CHUNK < a->numel ? start + TM_CHUNK : a->numel;
            tm_tau_stats_range(a, start, end, scratch, partial + (size_t)c * per_chunk);
        }
        free(scratch);
    }
    if (!failed)
        for (int64_t c = 0; c < chunks; c++)
            for (int i = 0; i < n; i++) {
                const double *p = partial + (size_t)c * per_chunk + (size_t)i * TM_STAT_COLUMNS;
                double *o = out + (size_t)i * TM_STAT_COLUMNS;
                o[0] += p[0];
                o[1] += p[1];
                o[2] += p[2];
                o[3] += p[3];
                o[4] = p[4] > o[4] ? p[4] : o[4];
                o[5] += p[5];
                o[6] += p[6];
            }
    for (int i = 0; i < n; i++) /* a NaN entry makes Σ|x| NaN; the comparisons above skipped it */
        if (isnan(out[(size_t)i * TM_STAT_COLUMNS + 3])) out[(size_t)i * TM_STAT_COLUMNS + 4] = NAN;
    free(partial);
    return failed ? TM_ENOMEM : TM_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* Task-vector statistics and Gram matrix together (LwPTV's cosine_to_mean): one read          */

#define TM_GRAM_PAIRS (TM_MAX_EXPERTS * (TM_MAX_EXPERTS + 1) / 2)

/* tm_tau_stats_range's columns (the same lanes, added in the same order: equal bits) plus
   G[i][k] = Σ xᵢ·xₖ (k >= i, 8 lanes) over [start, end), each block of base loaded once. */
TM_HOT void tm_tau_stats_gram_range(const tm_args *a, int64_t start, int64_t end, float *scratch, double *xs, double *out,
                                    double *gram) {
    const int n = a->n_experts;
    float *b = scratch, *e = scratch + TM_BLOCK;
    const tm_v8i abs_mask = {INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX, INT64_MAX};
    tm_v8d s1[TM_MAX_EXPERTS], s2[TM_MAX_EXPERTS], sa[TM_MAX_EXPERTS], s3[TM_MAX_EXPERTS], s4[TM_MAX_EXPERTS],
        mx[TM_MAX_EXPERTS], g[TM_GRAM_PAIRS];
    const tm_v8d zero = {0};
    for (int i = 0; i < n; i++) s1[i] = s2[i] = sa[i] = s3[i] = s4[i] = mx[i] = zero;
    for (int p = 0; p < n * (n + 1) / 2; p++) g[p] = zero;
    for (int64_t s = start; s < end; s += TM_BLOCK) {
        const int m = block_len(s, end);
        const int m8 = (m + TM_STAT_LANES - 1) & ~(TM_STAT_LANES - 1);
        load_block(a->base, a->base_dtype, s, m, b);
        for (int i = 0; i < n; i++) {
            double *x = xs + (size_t)i * TM_BLOCK;
            load_block(a->experts[i], a->expert_dtype[i], s, m, e);
            for (int j = 0; j < m; j++) x[j] = (double)e[j] - (double)b[j];
            for (int j = m; j < m8; j++) x[j] = 0.0;
            for (int j0 = 0; j0 < m8; j0 += TM_STAT_LANES) {
                tm_v8d v, av, v2;
                memcpy(&v, x + j0, sizeof v);
                av = (tm_v8d)((tm_v8i)v & abs_mask);
                v2 = v * v;
                s1[i] += v;
                s2[i] += v2;
                sa[i] += av;
                s3[i] += v2 * v;
                s4[i] += v2 * v2;
                const tm_v8i greater = av > mx[i];
                mx[i] = (tm_v8d)(((tm_v8i)av & greater) | ((tm_v8i)mx[i] & ~greater));
            }
        }
        int p = 0;
        for (int i = 0; i < n; i++)
            for (int k = i; k < n; k++, p++) {
                const double *xi = xs + (size_t)i * TM_BLOCK, *xk = xs + (size_t)k * TM_BLOCK;
                tm_v8d acc = g[p];
                for (int j0 = 0; j0 < m8; j0 += TM_STAT_LANES) {
                    tm_v8d u, v;
                    memcpy(&u, xi + j0, sizeof u);
                    memcpy(&v, xk + j0, sizeof v);
                    acc += u * v;
                }
                g[p] = acc;
            }
    }
    for (int i = 0; i < n; i++) {
        double *o = out + (size_t)i * TM_STAT_COLUMNS;
        o[0] = (double)(end - start);
        o[1] = o[2] = o[3] = o[4] = o[5] = o[6] = 0.0;
        for (int l = 0; l < TM_STAT_LANES; l++) {
            o[1] += s1[i][l];
            o[2] += s2[i][l];
            o[3] += sa[i][l];
            o[4] = mx[i][l] > o[4] ? mx[i][l] : o[4];
            o[5] += s3[i][l];
            o[6] += s4[i][l];
        }
    }
    for (int p = 0; p < n * (n + 1) / 2; p++) {
        gram[p] = 0.0;
        for (int l = 0; l < TM_STAT_LANES; l++) gram[p] += g[p][l];
    }
}

/*
 * stats: n × 7 as tm_tau_stats (bit for bit); gram: n × n float64, G[i][k] = Σ τᵢ·τₖ of the
 * float64 τ, summed per chunk (8 lanes) then chunks in order (independent of the thread count;
 * it differs from a BLAS x·xᵀ only by summation order).
 */
int tm_tau_stats_gram(const tm_args *a, double *stats, double *gram) {
    int rc = check_args(a);
    if (rc) return rc;
    const int n = a->n_experts;
    for (int i = 0; i < n; i++) {
        if (a->keep_mode[i] == KEEP_NONE || !valid_dtype(a->base_dtype)) return TM_EINVAL;
        for (int c = 0; c < TM_STAT_COLUMNS; c++) stats[(size_t)i * TM_STAT_COLUMNS + c] = 0.0;
    }
    for (size_t q = 0; q < (size_t)n * n; q++) gram[q] = 0.0;
    if (a->numel == 0 || n == 0) return TM_OK;
    const int64_t chunks = (a->numel + TM_CHUNK - 1) / TM_CHUNK;
    const int pairs = n * (n + 1) / 2;
    const size_t per_chunk = (size_t)n * TM_STAT_COLUMNS + (size_t)pairs;
    double *partial = malloc((size_t)chunks * per_chunk * sizeof(double));
    if (!partial) return TM_ENOMEM;
    int failed = 0;
    int nt = a->n_threads > 0 ? a->n_threads : 1;
    if (nt > chunks) nt = (int)chunks;
#pragma omp parallel num_threads(nt)
    {
        float *scratch = malloc(2 * TM_BLOCK * sizeof(float));
        double *xs = malloc((size_t)n * TM_BLOCK * sizeof(double));
        if (!scratch || !xs) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 4)
        for (int64_t c = 0; c < chunks; c++) {
            if (!scratch || !xs) continue;
            const int64_t start = c * TM_CHUNK, end = start + TM_CHUNK < a->numel ? start + TM_CHUNK : a->numel;
            double *p = partial + (size_t)c * per_chunk;
            tm_tau_stats_gram_range(a, start, end, scratch, xs, p, p + (size_t)n * TM_STAT_COLUMNS);
        }
        free(scratch);
        free(xs);
    }
    if (!failed)
        for (int64_t c = 0; c < chunks; c++) {
            for (int i = 0; i < n; i++) {
                const double *p = partial + (size_t)c * per_chunk + (size_t)i * TM_STAT_COLUMNS;
                double *o = stats + (size_t)i * TM_STAT_COLUMNS;
                o[0] += p[0];
                o[1] += p[1];
                o[2] += p[2];
                o[3] += p[3];
                o[4] = p[4] > o[4] ? p[4] : o[4];
                o[5] += p[5];
                o[6] += p[6];
            }
            const double *pg = partial + (size_t)c * per_chunk + (size_t)n * TM_STAT_COLUMNS;
            int p = 0;
            for (int i = 0; i < n; i++)
                for (int k = i; k < n; k++, p++) gram[(size_t)i * n + k] += pg[p];
        }
    for (int i = 0; i < n; i++) {
        if (isnan(stats[(size_t)i * TM_STAT_COLUMNS + 3])) stats[(size_t)i * TM_STAT_COLUMNS + 4] = NAN;
        for (int k = 0; k < i; k++) gram[(size_t)i * n + k] = gram[(size_t)k * n + i];
    }
    free(partial);
    return failed ? TM_ENOMEM : TM_OK;
}
/*
 * XXH64 (xxHash, 64-bit, by Yann Collet; written from the published algorithm description), as
 * a streaming hash over the bytes of output shards. It is the writer's checksum for --resume:
 * SHA-256 ran at about 1.3 GB/s on one core, a quarter of the whole merge's CPU time for
 * task arithmetic; XXH64 runs near memory speed. The digest equals the reference
 * implementation's for any split of the input into updates (tests/test_checksum.py).
 */
#define XXH_P1 0x9E3779B185EBCA87ULL
#define XXH_P2 0xC2B2AE3D27D4EB4FULL
#define XXH_P3 0x165667B19E3779F9ULL
#define XXH_P4 0x85EBCA77C2B2AE63ULL
#define XXH_P5 0x27D4EB2F165667C5ULL

typedef struct {
    uint64_t v[4];
    uint64_t total;
    uint64_t seed;
    uint8_t mem[32];
    uint32_t used;
} tm_xxh64_state;

static inline uint64_t xxh_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t xxh_read64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);  // little-endian hosts only, like the rest of this file
    return v;
}
static inline uint32_t xxh_read32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * XXH_P2;
    acc = xxh_rotl(acc, 31);
    return acc * XXH_P1;
}
static inline uint64_t xxh_merge_round(uint64_t acc, uint64_t val) {
    acc ^= xxh_round(0, val);
    return acc * XXH_P1 + XXH_P4;
}

int64_t tm_xxh64_state_size(void) { return (int64_t)sizeof(tm_xxh64_state); }

void tm_xxh64_reset(tm_xxh64_state *s, uint64_t seed) {
    memset(s, 0, sizeof(*s));
    s->seed = seed;
    s->v[0] = seed + XXH_P1 + XXH_P2;
    s->v[1] = seed + XXH_P2;
    s->v[2] = seed;
    s->v[3] = seed - XXH_P1;
}

void tm_xxh64_update(tm_xxh64_state *s, const void *data, int64_t len) {
    const uint8_t *p = (const uint8_t *)data;
    const uint8_t *end = p + len;
    if (len <= 0) return;
    s->total += (uint64_t)len;
    if (s->used + (uint64_t)len < 32) {
        memcpy(s->mem + s->used, p, (size_t)len);
        s->used += (uint32_t)len;
        return;
    }
    if (s->used) {
        uint32_t fill = 32 - s->used;
        memcpy(s->mem + s->used, p, fill);
        for (int i = 0; i < 4; i++) s->v[i] = xxh_round(s->v[i], xxh_read64(s->mem + 8 * i));
        p += fill;
        s->used = 0;
    }
    uint64_t v0 = s->v[0], v1 = s->v[1], v2 = s->v[2], v3 = s->v[3];
    while (end - p >= 32) {
        v0 = xxh_round(v0, xxh_read64(p));
        v1 = xxh_round(v1, xxh_read64(p + 8));
        v2 = xxh_round(v2, xxh_read64(p + 16));
        v3 = xxh_round(v3, xxh_read64(p + 24));
        p += 32;
    }
    s->v[0] = v0, s->v[1] = v1, s->v[2] = v2, s->v[3] = v3;
    if (p < end) {
        memcpy(s->mem, p, (size_t)(end - p));
        s->used = (uint32_t)(end - p);
    }
}

uint64_t tm_xxh64_digest(const tm_xxh64_state *s) {
    uint64_t h;
    if (s->total >= 32) {
        h = xxh_rotl(s->v[0], 1) + xxh_rotl(s->v[1], 7) + xxh_rotl(s->v[2], 12) + xxh_rotl(s->v[3], 18);
        for (int i = 0; i < 4; i++) h = xxh_merge_round(h, s->v[i]);
    } else {
        h = s->seed + XXH_P5;
    }
    h += s->total;
    const uint8_t *p = s->mem;
    uint32_t left = s->used;
    while (left >= 8) {
        h ^= xxh_round(0, xxh_read64(p));
        h = xxh_rotl(h, 27) * XXH_P1 + XXH_P4;
        p += 8, left -= 8;
    }
    if (left >= 4) {
        h ^= (uint64_t)xxh_read32(p) * XXH_P1;
        h = xxh_rotl(h, 23) * XXH_P2 + XXH_P3;
        p += 4, left -= 4;
    }
    while (left > 0) {
        h ^= (uint64_t)(*p) * XXH_P5;
        h = xxh_rotl(h, 11) * XXH_P1;
        p++, left--;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}
