// The CUDA source itself, compiled by the host compiler for the emulator (TRIPLETLOSS_EMULATED, cuda_compat.h).
#include "../cuda/epilogue_kernel.cu"
