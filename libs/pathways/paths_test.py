"""Path roots: containment after resolving `..` and symbolic links; bad settings named."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pathways import paths


def test_paths_under_a_root_pass_and_escapes_do_not(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    roots = paths.Roots.of([root])
    assert roots.check(str(root / "a" / "new"), "directory") == root.resolve() / "a" / "new"
    assert roots.check(str(root), "directory") == root.resolve()
    for bad in [tmp_path / "outside", root / ".." / "outside", root / "link" / "x", "/etc"]:
        with pytest.raises(paths.PathError, match=f"directory '{bad}' is outside the allowed"):
            roots.check(str(bad), "directory")
    with pytest.raises(paths.PathError, match="directory is required"):
        roots.check("", "directory")
    # A sibling whose name starts like the root is not under it.
    with pytest.raises(paths.PathError):
        roots.check(str(tmp_path / "runs-other"), "directory")


def test_settings_and_defaults(tmp_path):
    ckpt = tmp_path / "run" / "ckpt"
    roots = paths.Roots.around(ckpt)
    assert ckpt.resolve() in roots.roots and ckpt.resolve().parent in roots.roots
    assert all(r != r.parent for r in paths.Roots.around("/checkpoint").roots)  # never "/"
    parsed = paths.Roots.parse(f"{tmp_path}{os.pathsep}{tmp_path / 'b'}")
    assert parsed.roots == (tmp_path.resolve(), (tmp_path / "b").resolve())
    with pytest.raises(paths.PathError, match="is the filesystem root"):
        paths.Roots.parse("/")
    with pytest.raises(paths.PathError, match="no path roots"):
        paths.Roots.parse("")


def test_job_roots_default_and_setting(tmp_path, monkeypatch):
    import dataclasses
    import tempfile

    monkeypatch.chdir(tmp_path)
    roots = paths.job_roots({})
    assert roots.roots == (tmp_path.resolve(), Path(os.path.realpath(tempfile.gettempdir())))
    roots = paths.job_roots({paths.ENV_JOB_ROOTS: str(tmp_path / "runs")})

    @dataclasses.dataclass
    class Req:
        spec: str
        out: str
        data: tuple = ()
        student_spec: object = None

    ok = Req(str(tmp_path / "runs" / "s.yaml"), str(tmp_path / "runs" / "o"), (), {"a": 1})
    paths.check_job(ok, roots)
    for bad, field in [
        (Req(ok.spec, "/etc/x"), "out"),
        (Req(ok.spec, ok.out, (ok.out, "/etc/passwd")), "data[1]"),
        (Req(str(tmp_path / "s.yaml"), ok.out), "spec"),
    ]:
        with pytest.raises(paths.PathError, match=rf"^{re.escape(field)} .* PATHWAYS_JOB_ROOTS"):
            paths.check_job(bad, roots)


def test_a_nul_character_is_a_path_error(tmp_path):
    """Found by tools/bench/fuzz.py: os.path.realpath's ValueError came back as INTERNAL."""
    with pytest.raises(paths.PathError, match="contains a NUL character"):
        paths.Roots.of([tmp_path]).check("a\0b", "checkpoint")
