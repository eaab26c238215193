"""The suites. Imported before conftest.py and every test module, so the BLAS MLX's
CPU backend uses is chosen here, before anything imports mlx (conform_mlx/blas.py)."""

from conform_mlx import blas

blas.load()
