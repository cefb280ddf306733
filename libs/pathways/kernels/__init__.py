"""Native CPU kernels registered with XLA: a decode-step matmul over packed weights and attention
against the KV cache. Built on first use; `PATHWAYS_KERNELS=xla` turns them off (see `build`)."""

from pathways import backends
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

# The ops model files reach through the seam (they never import this package).
backends.register("packed_matmul", matmul)
backends.register("attend_cached", attend_cached)

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
