// Tile sizes per variant (FlashAttention-style "kernel traits"). Chosen so that the v1 kernel's
// shared memory stays under 99 KiB (the opt-in limit of sm_86/sm_89; sm_80/sm_90 allow more).
//
//   HM_BR  virtual queries per block (one query tile)
//   HM_BC  virtual keys per KV tile
//   HM_NT  threads per block
#ifndef HM_NT
#define HM_NT 128
#endif

#if HM_HD <= 64
#define HM_BR 32
#define HM_BC 64
#elif HM_HD <= 128
#define HM_BR 32
#define HM_BC 32
#else
#define HM_BR 16
#define HM_BC 16
#endif

// Row pitch of the f32 shared tiles: +1 so that threads walking rows hit distinct banks.
#define HM_HDP (HM_HD + 1)
#define HM_SSP (HM_BC + 1)
// Output elements each thread keeps in registers (BR * HD divisible by NT for every variant).
#define HM_OPT ((HM_BR * HM_HD) / HM_NT)
