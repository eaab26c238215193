"""The suites. Imported before conftest.py and every test module, so the BLAS MLX's
CPU backend uses is chosen here, before anything imports mlx (conform/blas.py)."""

from conform import blas

blas.load()
