"""Module server: hosts one module of a checkpoint as pathways.v1.ModuleService and, started with
--training, trains a copy of it as pathways.v1.TrainingService on the same port (the served
weights change only through ModuleService.Publish)."""

from __future__ import annotations

import argparse
import logging
import sys

from pathways.backends import BackendError, check_settings
from pathways.pipeline import service as training
from pathways.serving import server, settings
from pathways.serving.errors import NotFound


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(prog="module_server", description=__doc__)
    settings.add_args(p)
    try:
        s = settings.from_args(p.parse_args(argv))
        check_settings()  # PATHWAYS_KERNELS etc., checked before any weights load
        # TrainingService only on a server started to train (--training / PATHWAYS_TRAINING=1).
        server.serve(s, add_ons=[training.ADD_ON] if s.training else [])
    except (NotFound, FileNotFoundError, ValueError, BackendError) as e:
        print(f"module_server: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
