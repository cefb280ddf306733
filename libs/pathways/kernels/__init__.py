"""Native CPU kernels registered with XLA: a decode-step matmul over packed weights and attention
against the KV cache. Built on first use; `PATHWAYS_KERNELS=xla` turns them off (see `build`)."""

from pathways.kernels.attention import attend_cached
from pathways.kernels.build import MODES, KernelError, available, mode, tiles_available
from pathways.kernels.matmul import (
    WEIGHTS,
    check_weights,
    matmul,
    pack,
    pack_state,
    unpack,
    unpack_state,
)

__all__ = [
    "MODES",
    "WEIGHTS",
    "KernelError",
    "attend_cached",
    "available",
    "check_weights",
    "matmul",
    "mode",
    "pack",
    "pack_state",
    "tiles_available",
    "unpack",
    "unpack_state",
]
