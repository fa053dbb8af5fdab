/* MKL chooses its kernels by CPU vendor: on AMD it runs AVX2 code even when the CPU has
 * AVX-512. It asks this function whether the CPU is Intel's; this answer, loaded into the
 * global symbol scope before torch (bnrepro/mkl_vendor.py), makes it choose by the CPU's
 * features instead. A plain shared library, loaded with ctypes, never imported. */
int mkl_serv_intel_cpu_true(void) { return 1; }
