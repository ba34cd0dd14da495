// headmix CUDA kernels: the tensor-core tile vocabulary of sm_80+ kernels (ThunderKittens-style):
// 16-byte cp.async into shared memory with commit/wait groups, ldmatrix fragment loads, and
// mma.sync.m16n8k16 with f32 accumulators. Each helper is one PTX instruction; under HM_EMU the
// CPU emulator (kernels-cuda/emu) supplies a model of each, written from the PTX ISA.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4; two 16-bit values per register,
// the lower column/k index in the low half):
//   A 16x16 (row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8  (k x n, "col"): b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..2t+9, n = g)
//   C 16x8  (f32): c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// ldmatrix .x4 loads four 8x8 16-bit matrices; lanes 8i .. 8i+7 give the row addresses of
// matrix i, and lane l receives register i = (row l/4, columns 2(l%4), 2(l%4)+1) of matrix i,
// or with .trans (rows 2(l%4), 2(l%4)+1, column l/4): a row-major A tile is .x4, a B tile
// stored [n][k] is .x4 (two n-tiles), a B tile stored [k][n] is .x4.trans.
#if defined(HM_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#if HM_DTYPE != 0

#ifndef HM_EMU
// Shared-memory (state space) address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned hm_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared (a shared-space address), asynchronous, L1 bypassed (.cg); !valid:
// 16 zero bytes (src-size 0; src must still be a valid address).
__device__ __forceinline__ void hm_cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
// Close the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void hm_cp_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are pending (the older ones landed).
// Other threads' copies are visible only after a barrier.
template <int N> __device__ __forceinline__ void hm_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix from shared-space addresses (32-bit: a base plus constant offsets folds into the
// instruction's immediate).
__device__ __forceinline__ void hm_ldsm_x4(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void hm_ldsm_x4_trans(unsigned* r, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// C += A * B on the tensor cores (f16 or bf16 inputs by HM_DTYPE, f32 accumulators).
__device__ __forceinline__ void hm_mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if HM_DTYPE == 1
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#else  // HM_EMU: the emulator's models (emu.cpp defines them before including the kernels)
#define hm_smem_addr hm_emu_smem_addr
#define hm_cp_async16 hm_emu_cp_async16
#define hm_cp_commit hm_emu_cp_commit
#define hm_cp_wait hm_emu_cp_wait
#define hm_ldsm_x4(r, p) hm_emu_ldsm(r, p, 4, false)
#define hm_ldsm_x4_trans(r, p) hm_emu_ldsm(r, p, 4, true)
#define hm_mma16816 hm_emu_mma
#endif

// Two f32 values rounded (to nearest even) to the storage type, packed (lo in the low half):
// one cvt.rn.{bf16x2,f16x2}.f32 on the device.
__device__ __forceinline__ unsigned hm_pack2(float lo, float hi) {
#ifdef HM_EMU
    return (unsigned)hm_from_f32(lo) | ((unsigned)hm_from_f32(hi) << 16);
#else
    unsigned r;
#if HM_DTYPE == 1
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
#endif
}

#endif // HM_DTYPE != 0
#endif // sm_80+ or emulator
