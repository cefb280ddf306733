"""Directories a server reads or writes on a caller's behalf (TrainingService.Save/Load): only
under configured roots, checked after resolving `..` and symbolic links."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

ENV_ROOTS = "PATHWAYS_PATH_ROOTS"  # os.pathsep-separated


class PathError(ValueError):
    """A path outside every root, or none given; the message names the field, path and roots."""


@dataclasses.dataclass(frozen=True)
class Roots:
    roots: tuple[Path, ...]

    @classmethod
    def of(cls, paths: Iterable[str | Path]) -> Roots:
        out = []
        for p in paths:
            if str(p).strip():
                r = Path(os.path.realpath(p))
                if r == Path(r.anchor):
                    raise PathError(
                        f"path root {str(p)!r} is the filesystem root: name a directory"
                    )
                out.append(r)
        if not out:
            raise PathError("no path roots: name at least one directory")
        return cls(tuple(dict.fromkeys(out)))

    @classmethod
    def parse(cls, text: str) -> Roots:
        """Roots from an os.pathsep-separated list (PATHWAYS_PATH_ROOTS, --path-roots)."""
        return cls.of(text.split(os.pathsep))

    @classmethod
    def around(cls, checkpoint: str | Path) -> Roots:
        """The default of a module server: its checkpoint's directory and the one holding it (a
        run's directory, where its training writes), and the server's working directory, each
        unless it is the filesystem root."""
        ckpt = Path(os.path.realpath(checkpoint))
        candidates = [ckpt, ckpt.parent, Path.cwd()]
        return cls.of(c for c in candidates if c != Path(c.anchor))

    def check(self, path: str, field: str, setting: str = "") -> Path:
        """`path` resolved (relative to the working directory), if it lies under a root;
        `setting`: where the roots come from, for the message (default: a module server's)."""
        if not path:
            raise PathError(f"{field} is required")
        if "\0" in path:  # the OS would refuse it (ValueError: embedded null byte)
            raise PathError(f"{field} {path!r} contains a NUL character")
        resolved = Path(os.path.realpath(path))
        for r in self.roots:
            if resolved == r or r in resolved.parents:
                return resolved
        roots = ", ".join(str(r) for r in self.roots)
        setting = setting or f"the server's --path-roots / {ENV_ROOTS}"
        raise PathError(
            f"{field} {path!r} is outside the allowed directories ({roots}); {setting} sets them"
        )

    def __str__(self) -> str:
        return os.pathsep.join(str(r) for r in self.roots)


ENV_JOB_ROOTS = "PATHWAYS_JOB_ROOTS"  # os.pathsep-separated, read by coordinator workers


def job_roots(env=os.environ) -> Roots:
    """Where coordinator jobs may read specs and data and write checkpoints: PATHWAYS_JOB_ROOTS,
    else the worker's working directory and the system's temporary directory (never `/`).
    `LocalDeployment` gives its worker the run, log and checkpoint directories."""
    import tempfile

    raw = env.get(ENV_JOB_ROOTS, "")
    if raw.strip():
        return Roots.parse(raw)
    candidates = [Path(os.path.realpath(p)) for p in (os.getcwd(), tempfile.gettempdir())]
    return Roots.of(c for c in candidates if c != Path(c.anchor))


def check_job(req, roots: Roots | None = None) -> None:
    """A job request's paths (`spec`, `out`, `data`, `teacher`, `router_checkpoint`, whichever it
    has) under the worker's job roots; PathError (a ValueError: the job fails with it) names
    field and path."""
    roots = job_roots() if roots is None else roots
    setting = f"the coordinator worker's {ENV_JOB_ROOTS}"
    fields = ("spec", "student_spec", "out", "teacher", "store", "baseline", "router_checkpoint")
    for field in fields:
        value = getattr(req, field, None)
        if value and isinstance(value, str | Path):  # a distillation's student_spec may be a dict
            roots.check(str(value), field, setting)
    for i, d in enumerate(getattr(req, "data", ()) or ()):
        roots.check(str(d), f"data[{i}]", setting)
