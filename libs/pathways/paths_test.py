"""Path roots: containment after resolving `..` and symbolic links; bad settings named."""

from __future__ import annotations

import os

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
