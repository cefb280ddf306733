"""Native CPU kernels registered with XLA: a decode-step matmul over packed weights and attention
against the KV cache. Built on first use and used for the shapes where they measured faster
(`PATHWAYS_KERNELS=auto`, the default; `xla` turns them off; see `build`)."""

from pathways import backends
from pathways.kernels.attention import attend_cached
from pathways.kernels.build import (
    MODES,
    SHAPES,
    KernelError,
    available,
    chosen,
    mode,
    tiles_available,
)
from pathways.kernels.matmul import (
    WEIGHTS,
    check_weights,
    matmul,
    pack,
    pack_leaf,
    pack_state,
    unpack,
    unpack_state,
)

# The ops model files reach through the seam (they never import this package).
backends.register("packed_matmul", matmul)
backends.register("attend_cached", attend_cached)

__all__ = [
    "MODES",
    "SHAPES",
    "WEIGHTS",
    "KernelError",
    "attend_cached",
    "available",
    "chosen",
    "check_weights",
    "matmul",
    "mode",
    "pack",
    "pack_leaf",
    "pack_state",
    "tiles_available",
    "unpack",
    "unpack_state",
]
