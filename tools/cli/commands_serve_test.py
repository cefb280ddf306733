"""`pathways up`'s deployment, built from its flags without starting it."""

from pathlib import Path

from pathways import checkpoint as ckpt
from pathways import spec as spec_lib
from pathways.deploy import local
from pathways.tokenizers import ByteTokenizer
from tools.cli.commands_serve import local_deployment
from tools.cli.main import build_parser

SPEC = {
    "modules": {
        "embed": {"kind": "embedding", "vocab_size": 257, "d_model": 6, "max_seq_len": 13},
        "head": {"kind": "decoding", "d_model": 6, "vocab_size": 257},
    },
    "pathways": {"p": ["embed", "head"]},
}


def _checkpoint(directory: Path) -> Path:
    """A checkpoint as far as `up` looks before starting anything: the spec, and a directory
    per module (their weights are read by the module servers only)."""
    spec = spec_lib.from_dict(SPEC)
    ckpt.save_spec(directory, spec, ByteTokenizer())
    for m in spec.modules:
        ckpt.module_dir(directory, m).mkdir(parents=True)
    return directory


def _gateway_pathways_file(checkpoint: str) -> Path:
    args = build_parser().parse_args(["up", "--checkpoint", checkpoint, "--insecure"])
    flags = local_deployment(args)._gateway_args()
    return Path(flags[flags.index("--pathways-file") + 1])


def test_up_keeps_the_gateway_pathway_table_per_checkpoint_in_the_state_directory(
    tmp_path, monkeypatch
):
    home = tmp_path / "home"
    monkeypatch.setenv("PATHWAYS_HOME", str(home))
    monkeypatch.delenv(local.PATHWAYS_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    a, b = _checkpoint(tmp_path / "run-a"), _checkpoint(tmp_path / "run-b")
    first = _gateway_pathways_file(str(a))
    assert first.parent == home / "gateway-pathways" and first.name.startswith("run-a-")
    # `up` again on the same checkpoint (however it is spelled): the same table.
    assert _gateway_pathways_file("run-a") == first
    # Another checkpoint starts from its own spec: a file of its own.
    assert _gateway_pathways_file(str(b)) != first
    # PATHWAYS_PATHWAYS_FILE, the gateway's own variable, chooses the file for `up` too.
    monkeypatch.setenv(local.PATHWAYS_FILE_ENV, "mine.json")
    assert _gateway_pathways_file(str(a)) == tmp_path / "mine.json"
