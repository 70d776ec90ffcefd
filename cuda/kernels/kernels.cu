// Kernels of gpumesh: element-wise reductions for the collectives and
// fill/check kernels for tests. Compiled to PTX (compute_75) by
// `go generate ./cuda/...`, embedded in the binary and JIT-compiled by the
// driver, so the binary depends only on libcuda.so.1.
//
// Every kernel takes only 64-bit parameters (pointers, unsigned long long,
// long long, double): the Go launcher copies each parameter as 8 bytes.
//
// Naming: reduce_<op>_<dtype>(dst, src, n) computes dst[i] = dst[i] op src[i]
// for i < n. div_<dtype>(dst, n, d) divides in place (avg = sum then div).
// float16 and bfloat16 are computed in float64 and rounded once to nearest
// even, and max/min select operand bits: bit for bit what the host reference
// (package collective) computes.

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned short u16;

// ---- half and bfloat16 conversions (bit exact, round to nearest even) ----

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(u16 b) {
    return __uint_as_float(((unsigned int)b) << 16);
}
__device__ __forceinline__ u16 f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep it a quiet NaN
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// double -> float rounded to odd (truncate, then set the last bit when
// inexact): a following round-to-nearest-even to a type of at most 22
// significand bits then equals one correct rounding of the double, which is
// what the host reference does (compute in float64, round once).
__device__ __forceinline__ float d2f_odd(double x) {
    float f = __double2float_rz(x);
    if ((double)f != x && x == x) {
        f = __uint_as_float(__float_as_uint(f) | 1u);
    }
    return f;
}

// ---- ops on a compute type ----

struct OpSum  { static const bool sel = false; template <typename T> __device__ static T f(T a, T b) { return a + b; } };
struct OpProd { static const bool sel = false; template <typename T> __device__ static T f(T a, T b) { return a * b; } };
// Max and min select one operand's bits, like the host reference: the source
// wins when it compares greater (less) or is NaN.
struct OpMax  { static const bool sel = true; template <typename T> __device__ static bool take(T a, T b) { return b > a || b != b; } };
struct OpMin  { static const bool sel = true; template <typename T> __device__ static bool take(T a, T b) { return b < a || b != b; } };

// Storage type S, compute type C, load/store conversions.
struct F32  { typedef float  S; typedef float  C; __device__ static C ld(S v) { return v; } __device__ static S st(C v) { return v; } };
struct F64  { typedef double S; typedef double C; __device__ static C ld(S v) { return v; } __device__ static S st(C v) { return v; } };
struct I32  { typedef int    S; typedef int    C; __device__ static C ld(S v) { return v; } __device__ static S st(C v) { return v; } };
struct I64  { typedef i64    S; typedef i64    C; __device__ static C ld(S v) { return v; } __device__ static S st(C v) { return v; } };
struct F16  { typedef u16    S; typedef double C; __device__ static C ld(S v) { return (double)h2f(v); } __device__ static S st(C v) { return f2h(d2f_odd(v)); } };
struct BF16 { typedef u16    S; typedef double C; __device__ static C ld(S v) { return (double)bf2f(v); } __device__ static S st(C v) { return f2bf(d2f_odd(v)); } };
struct U8   { typedef unsigned char S; typedef unsigned int C; __device__ static C ld(S v) { return v; } __device__ static S st(C v) { return (S)v; } };

// Integer sum and product wrap around (two's complement), like Go.
template <> __device__ int OpSum::f<int>(int a, int b)   { return (int)((unsigned)a + (unsigned)b); }
template <> __device__ int OpProd::f<int>(int a, int b)  { return (int)((unsigned)a * (unsigned)b); }
template <> __device__ i64 OpSum::f<i64>(i64 a, i64 b)   { return (i64)((u64)a + (u64)b); }
template <> __device__ i64 OpProd::f<i64>(i64 a, i64 b)  { return (i64)((u64)a * (u64)b); }

template <typename D, typename O, bool SEL = O::sel> struct Apply;
template <typename D, typename O> struct Apply<D, O, false> {
    __device__ static typename D::S f(typename D::S a, typename D::S b) { return D::st(O::f(D::ld(a), D::ld(b))); }
};
template <typename D, typename O> struct Apply<D, O, true> {
    __device__ static typename D::S f(typename D::S a, typename D::S b) { return O::take(D::ld(a), D::ld(b)) ? b : a; }
};

// Vector width: 16 bytes per thread per step where both pointers allow it.
template <typename D, typename O>
__device__ __forceinline__ void reduce_body(typename D::S* dst, const typename D::S* src, u64 n) {
    typedef typename D::S S;
    const int W = 16 / sizeof(S);
    u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 stride = (u64)gridDim.x * blockDim.x;
    bool aligned = ((((u64)dst) | ((u64)src)) & 15) == 0;
    u64 nv = aligned ? n / W : 0;
    for (u64 v = tid; v < nv; v += stride) {
        uint4 a = reinterpret_cast<const uint4*>(dst)[v];
        uint4 b = reinterpret_cast<const uint4*>(src)[v];
        S* pa = reinterpret_cast<S*>(&a);
        const S* pb = reinterpret_cast<const S*>(&b);
#pragma unroll
        for (int k = 0; k < W; k++) {
            pa[k] = Apply<D, O>::f(pa[k], pb[k]);
        }
        reinterpret_cast<uint4*>(dst)[v] = a;
    }
    for (u64 i = nv * W + tid; i < n; i += stride) {
        dst[i] = Apply<D, O>::f(dst[i], src[i]);
    }
}

// div for avg: float types divide in the compute type; integers truncate
// toward zero (Go's / on signed integers).
template <typename D>
__device__ __forceinline__ void div_body(typename D::S* dst, u64 n, double d) {
    u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 stride = (u64)gridDim.x * blockDim.x;
    typename D::C dc = (typename D::C)d;  // float32 divides in float32, like the host
    for (u64 i = tid; i < n; i += stride) {
        dst[i] = D::st(D::ld(dst[i]) / dc);
    }
}

#define REDUCE(OPN, OPT, DN, DT) \
extern "C" __global__ void reduce_##OPN##_##DN(DT::S* dst, const DT::S* src, u64 n) { reduce_body<DT, OPT>(dst, src, n); }

#define ALL_OPS(DN, DT) \
REDUCE(sum, OpSum, DN, DT) REDUCE(prod, OpProd, DN, DT) REDUCE(max, OpMax, DN, DT) REDUCE(min, OpMin, DN, DT) \
extern "C" __global__ void div_##DN(DT::S* dst, u64 n, double d) { div_body<DT>(dst, n, d); }

ALL_OPS(float32, F32)
ALL_OPS(float64, F64)
ALL_OPS(int32, I32)
ALL_OPS(int64, I64)
ALL_OPS(float16, F16)
ALL_OPS(bfloat16, BF16)
ALL_OPS(uint8, U8)

// ---- test kernels ----

// splitmix64: a deterministic value per (seed, index).
__device__ __forceinline__ u64 mix(u64 x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// fill_<dtype>(dst, n, seed): dst[i] = small integer in [-8, 8) (or [1, 3) for
// prod-friendly values when seed has its top bit set), exactly representable
// in every dtype, so sums of up to 16 ranks are exact in every dtype.
template <typename D>
__device__ __forceinline__ void fill_body(typename D::S* dst, u64 n, u64 seed) {
    u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 stride = (u64)gridDim.x * blockDim.x;
    bool small = (seed >> 63) != 0;
    for (u64 i = tid; i < n; i += stride) {
        u64 r = mix(seed ^ (i * 0x100000001b3ull));
        long long v = small ? (long long)(r % 2) + 1 : (long long)(r % 16) - 8;
        dst[i] = D::st((typename D::C)v);
    }
}

// count_mismatch_<dtype>(a, b, n, counter): atomically adds to *counter the
// number of i where the bits of a[i] and b[i] differ.
template <typename S>
__device__ __forceinline__ void mismatch_body(const S* a, const S* b, u64 n, u64* counter) {
    u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 stride = (u64)gridDim.x * blockDim.x;
    unsigned int local = 0;
    for (u64 i = tid; i < n; i += stride) {
        if (a[i] != b[i]) local++;
    }
    if (local) atomicAdd(counter, (u64)local);
}

#define TESTK(DN, DT) \
extern "C" __global__ void fill_##DN(DT::S* dst, u64 n, u64 seed) { fill_body<DT>(dst, n, seed); } \
extern "C" __global__ void count_mismatch_##DN(const DT::S* a, const DT::S* b, u64 n, u64* c) { mismatch_body<DT::S>(a, b, n, c); }

TESTK(float32, F32)
TESTK(float64, F64)
TESTK(int32, I32)
TESTK(int64, I64)
TESTK(float16, F16)
TESTK(bfloat16, BF16)
TESTK(uint8, U8)

// spin_ns(ns): waits ns nanoseconds of the global timer and does nothing
// else, so that the stream's later work runs late (Stream.Spin: tests that
// delay one stream against the others, as a GPU shared with other
// processes does).
extern "C" __global__ void spin_ns(u64 ns) {
    u64 start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
