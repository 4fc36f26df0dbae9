"""The CUDA kernels of csrc/ for GeoAlign's cuda backend: ``extension`` finds or JIT-builds the compiled module
(``geoalign_kernels._cuda_ops``), ``ops`` registers its kernels as torch.library custom ops with host-side checks.
Importing this package needs torch only; the kernels need a CUDA device."""
