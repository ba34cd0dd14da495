// Derived tile quantities of the v1 kernel ("kernel traits"). The tile sizes themselves are not
// restated here: the host's kernel table (host/src/backends/cuda/kernel_table.rs) puts them in
// the prelude of every variant:
//   HM_BR  virtual queries per block (one query tile)
//   HM_BC  virtual keys per KV tile
//   HM_NT  threads per block
//   HM_SMEM  dynamic shared memory per block, bytes (each kernel static_asserts its carve-up)
#if !defined(HM_BR) || !defined(HM_BC) || !defined(HM_NT) || !defined(HM_SMEM)
#error "HM_BR, HM_BC, HM_NT and HM_SMEM come from the host's prelude (kernel_table.rs)"
#endif

// Row pitch of the f32 shared tiles: +1 so that threads walking rows hit distinct banks.
#define HM_HDP (HM_HD + 1)
#define HM_SSP (HM_BC + 1)
// Output elements each thread keeps in registers (BR * HD divisible by NT for every variant).
#define HM_OPT ((HM_BR * HM_HD) / HM_NT)
