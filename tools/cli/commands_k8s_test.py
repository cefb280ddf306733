import pytest

from tools.cli import main as cli

SPEC = """
modules:
  embed: {kind: embedding, vocab_size: 11, d_model: 6, max_seq_len: 13}
  head: {kind: decoding, d_model: 6, vocab_size: 11}
pathways:
  p: [embed, head]
"""


def test_render_writes_a_base(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "base"
    assert (
        cli.main(
            [
                "k8s",
                "render",
                "--spec",
                str(spec),
                "--out",
                str(out),
                "--image-registry",
                "reg.test/pw",
                "--checkpoint-uri",
                "pvc://c/run",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "modules").iterdir()) == ["embed.yaml", "head.yaml"]
    assert "reg.test/pw/module-server:latest" in (out / "modules" / "head.yaml").read_text()
    assert "wrote 11 files for 2 modules" in capsys.readouterr().out


def test_render_rejects_a_bad_checkpoint_uri(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    assert (
        cli.main(
            [
                "k8s",
                "render",
                "--spec",
                str(spec),
                "--out",
                str(tmp_path / "o"),
                "--checkpoint-uri",
                "gs://bucket",
            ]
        )
        == 2
    )
    assert "checkpoint URI must be pvc://" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["status"], ["scale", "embed", "--replicas", "2"]])
def test_unreachable_cluster_is_one_line_exit_2(tmp_path, capsys, command):
    kubeconfig = tmp_path / "kubeconfig"
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    kubeconfig.write_text("""
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: ns}}]
current-context: x
""")
    assert cli.main([*command, "--kubeconfig", str(kubeconfig)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"pathways {command[0]}: error: cannot reach the Kubernetes API at https://127.0.0.1:1"
    )
    assert err.count("\n") == 1


def test_missing_kubeconfig(tmp_path, capsys):
    assert cli.main(["status", "--kubeconfig", str(tmp_path / "absent")]) == 2
    assert "cannot load kubeconfig" in capsys.readouterr().err
