// Kernels of the pipeline job's multi-layer perceptron on the GPU: matrix
// multiply with optional transposes, bias, activations and their gradients,
// column sums and axpy. float32, row-major. Compiled to PTX for compute_75
// by `go generate ./collective/pipeline/` and embedded (see device_cuda.go).
//
// Scalar parameters are passed as 64-bit slots (gorgonia.org/cu copies every
// kernel argument as 8 bytes); int and float arguments read the low 4 bytes.

#define TILE 16

// C[M×N] = alpha·op(A)·op(B) + beta·C, op(A) M×K, op(B) K×N.
// A is stored with colsA columns, B with colsB columns.
extern "C" __global__ void gemm_f32(int transA, int transB, int M, int N, int K, float alpha,
                                    const float* __restrict__ A, int colsA,
                                    const float* __restrict__ B, int colsB,
                                    float beta, float* __restrict__ C) {
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE + 1];
    int row = blockIdx.y * TILE + threadIdx.y;
    int col = blockIdx.x * TILE + threadIdx.x;
    float acc = 0.f;
    for (int t = 0; t < K; t += TILE) {
        int ka = t + threadIdx.x; // column of op(A) loaded by this thread
        int kb = t + threadIdx.y; // row of op(B) loaded by this thread
        float a = 0.f, b = 0.f;
        if (row < M && ka < K) a = transA ? A[(long)ka * colsA + row] : A[(long)row * colsA + ka];
        if (kb < K && col < N) b = transB ? B[(long)col * colsB + kb] : B[(long)kb * colsB + col];
        As[threadIdx.y][threadIdx.x] = a;
        Bs[threadIdx.y][threadIdx.x] = b;
        __syncthreads();
#pragma unroll
        for (int p = 0; p < TILE; ++p) acc += As[threadIdx.y][p] * Bs[p][threadIdx.x];
        __syncthreads();
    }
    if (row < M && col < N) {
        long i = (long)row * N + col;
        float c = alpha * acc;
        if (beta != 0.f) c += beta * C[i];
        C[i] = c;
    }
}

// x[r, c] += v[c]
extern "C" __global__ void add_row_vector_f32(float* x, const float* v, int rows, int cols) {
    long n = (long)rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] += v[i % cols];
}

// dst[c] = Σ_r x[r, c] + beta·dst[c] (rows summed in order, per column)
extern "C" __global__ void sum_rows_f32(float* dst, const float* x, int rows, int cols, float beta) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int r = 0; r < rows; ++r) s += x[(long)r * cols + c];
        dst[c] = (beta != 0.f) ? beta * dst[c] + s : s;
    }
}

extern "C" __global__ void tanh_f32(float* x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = tanhf(x[i]);
}

extern "C" __global__ void relu_f32(float* x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = x[i] < 0.f ? 0.f : x[i];
}

// dy *= 1 − y² (y = tanh output)
extern "C" __global__ void tanh_grad_f32(const float* y, float* dy, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dy[i] *= 1.f - y[i] * y[i];
}

// dy = 0 where y ≤ 0 (y = relu output)
extern "C" __global__ void relu_grad_f32(const float* y, float* dy, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        if (y[i] <= 0.f) dy[i] = 0.f;
}

// y += alpha·x
extern "C" __global__ void axpy_f32(float alpha, const float* x, float* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] += alpha * x[i];
}

// g = 2·(y − t)/denom: the gradient of the mean squared error, in float32
// exactly as the host computes it (IEEE division)
extern "C" __global__ void mse_grad_f32(const float* y, const float* t, float* g, long n, float denom) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float d = y[i] - t[i];
        g[i] = 2.f * d / denom;
    }
}
