// CPU emulator run of the backward kernels (bwd_v1.cu): it executes a launch plan written by the
// host (host/src/backends/cuda/backward.rs, `BwdPlan::write_emu`): the same buffers, the same
// argument blocks and the same kernels in the same order as the CUDA backend launches them. The
// caller (tests/cuda_backward_emu.rs) writes the plan and the input files, runs this program and
// compares the output files with the f64 reference backward.
//
// Plan file (text, one item per line):
//   buf <bytes> <in|out|tmp> <file>     buffers in slot order (slot s is pointer value s + 1)
//   args <hex>                          HmArgs, pointers as slot values (0: null)
//   bwd <hex>                           HmBwd, the same
//   launch <entry> <gx> <gy> <gz> <threads> <smem> <h0> <hc> <reduce>
//                                       (HmBwd's chunk h0, hc and reduce mask for this launch)
// `in` buffers are read from their file; `out` and `tmp` start as 0xff bytes (NaN in every dtype:
// an element no kernel writes stays NaN) and `out` buffers are written back to their file.
//
// Build: g++ -std=c++20 -O1 <the variant's prelude as -D flags> -iquote kernels-cuda
//        kernels-cuda/emu/bwd_emu.cpp   (HM_BWD_FILE: another kernel file, e.g. a broken copy)
// Run:   bwd_emu <plan file>

#define HM_EMU_DECODE 1 // emu.cpp: the CUDA surface and the launcher only (no forward kernels)
#define HM_EMU_MMA 1    // ... and its mma.sync model (bwd_v2)
#include "emu.cpp"

// __syncwarp: the warp's 32 fibers meet (bwd_v1.cu's BW_SYNCWARP under HM_EMU).
inline void hm_emu_syncwarp() { emu_wait(warp_bar[threadIdx.x >> 5]); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

#include "../traits.cuh"
#include "../mask.cuh"
#include "../softmax.cuh"
#ifndef HM_BWD_FILE
#define HM_BWD_FILE ../bwd_v1.cu
#endif
#define BW_STR_(x) #x
#define BW_STR(x) BW_STR_(x)
#include BW_STR(HM_BWD_FILE)
#if HM_BWD_TC // the bwd_v2 module: bwd_v1.cu, then bwd_v2.cu
#ifndef HM_BWD_TC_FILE
#define HM_BWD_TC_FILE ../bwd_v2.cu
#endif
#include BW_STR(HM_BWD_TC_FILE)
#endif

#include <fstream>
#include <sstream>

struct Buf {
    std::vector<unsigned char> data; // 16-byte aligned storage below
    size_t bytes;
    std::string role, file;
    void* ptr;
};

static std::vector<unsigned char> from_hex(const std::string& s) {
    std::vector<unsigned char> out(s.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) out[i] = (unsigned char)std::stoul(s.substr(2 * i, 2), nullptr, 16);
    return out;
}

// Replace the first `n` 8-byte words of a struct (slot values) by the buffers' addresses.
static void relocate(void* s, int n, std::vector<Buf>& bufs) {
    unsigned long long* w = (unsigned long long*)s;
    for (int i = 0; i < n; ++i) {
        if (w[i] == 0) continue;
        if (w[i] > bufs.size()) {
            std::fprintf(stderr, "bwd_emu: pointer slot %llu of %zu\n", w[i], bufs.size());
            std::exit(4);
        }
        w[i] = (unsigned long long)(uintptr_t)bufs[w[i] - 1].ptr;
    }
}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: bwd_emu <plan file>\n");
        return 2;
    }
    std::ifstream in(argv[1]);
    std::vector<Buf> bufs;
    HmArgs a{};
    HmBwd x{};
    struct Launch {
        std::string entry;
        Dim3 grid;
        int threads;
        size_t smem;
        int h0, hc, reduce;
    };
    std::vector<Launch> launches;
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream ls(line);
        std::string kind;
        ls >> kind;
        if (kind == "buf") {
            Buf b;
            ls >> b.bytes >> b.role >> b.file;
            b.data.assign(b.bytes + 16, 0xff);
            b.ptr = (void*)(((uintptr_t)b.data.data() + 15) & ~(uintptr_t)15);
            if (b.role == "in") {
                std::ifstream f(b.file, std::ios::binary);
                f.read((char*)b.ptr, (std::streamsize)b.bytes);
                if ((size_t)f.gcount() != b.bytes) {
                    std::fprintf(stderr, "bwd_emu: %s holds fewer than %zu bytes\n", b.file.c_str(), b.bytes);
                    return 4;
                }
            }
            bufs.push_back(std::move(b));
        } else if (kind == "args" || kind == "bwd") {
            std::string hex;
            ls >> hex;
            const auto bytes = from_hex(hex);
            const size_t want = kind == "args" ? sizeof(HmArgs) : sizeof(HmBwd);
            if (bytes.size() != want) {
                std::fprintf(stderr, "bwd_emu: %s has %zu bytes, the kernels' struct %zu\n", kind.c_str(), bytes.size(),
                             want);
                return 4;
            }
            std::memcpy(kind == "args" ? (void*)&a : (void*)&x, bytes.data(), want);
        } else if (kind == "launch") {
            Launch l;
            ls >> l.entry >> l.grid.x >> l.grid.y >> l.grid.z >> l.threads >> l.smem >> l.h0 >> l.hc >> l.reduce;
            if (!ls) {
                std::fprintf(stderr, "bwd_emu: bad launch line: %s\n", line.c_str());
                return 4;
            }
            launches.push_back(l);
        }
    }
    relocate(&a, 12, bufs); // HmArgs: 12 pointers first
    relocate(&x, HM_BWD_NPTR, bufs);
    using Entry = void (*)(const HmArgs, const HmBwd);
    const std::pair<const char*, Entry> entries[] = {
        {"hm_bwd_v1_mix", hm_bwd_v1_mix},         {"hm_bwd_v1_fwd", hm_bwd_v1_fwd},
        {"hm_bwd_v1_pre", hm_bwd_v1_pre},         {"hm_bwd_v1_ysum", hm_bwd_v1_ysum},
        {"hm_bwd_v1_norm", hm_bwd_v1_norm},
#if HM_BWD_TC
        {"hm_bwd_v2_dq", hm_bwd_v2_dq},           {"hm_bwd_v2_dkdv", hm_bwd_v2_dkdv},
#else
        {"hm_bwd_v1_dq", hm_bwd_v1_dq},           {"hm_bwd_v1_dkdv", hm_bwd_v1_dkdv},
#endif
        {"hm_bwd_v1_mixback", hm_bwd_v1_mixback},
        {"hm_bwd_v1_wgrad", hm_bwd_v1_wgrad},     {"hm_bwd_v1_reduce", hm_bwd_v1_reduce},
    };
    for (const Launch& l : launches) {
        Entry f = nullptr;
        for (const auto& [name, fn] : entries)
            if (l.entry == name) f = fn;
        if (!f) {
            std::fprintf(stderr, "bwd_emu: no kernel %s\n", l.entry.c_str());
            return 4;
        }
        x.h0 = l.h0, x.hc = l.hc, x.reduce = l.reduce;
        launch_fn([&] { f(a, x); }, l.grid, l.threads, l.smem);
    }
    for (Buf& b : bufs)
        if (b.role == "out") {
            std::ofstream f(b.file, std::ios::binary);
            f.write((const char*)b.ptr, (std::streamsize)b.bytes);
        }
    std::printf("bwd_emu: %zu launches, %zu buffers\n", launches.size(), bufs.size());
    return 0;
}
