"""asv benchmarks. The BLAS MLX's CPU backend uses is chosen here, before anything
imports mlx (conform_mlx/blas.py); asv.conf.json's matrix demands OpenBLAS for the history."""

from conform_mlx import blas

blas.load()
