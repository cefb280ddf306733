"""Tests for the local CLI commands, run in-process through main()."""

from pathlib import Path

import pytest

from pathways import checkpoint as ckpt
from pathways import generate as gen
from pathways import spec as spec_lib
from pathways.executor.local import LocalExecutor
from pathways.sampling import SamplingParams
from pathways.tokenizers import ByteTokenizer
from tools.cli.main import main

# The repository's examples/ (a BUILD dependency puts them in the test sandbox).
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BAD_SPEC = """
modules:
  embed: {kind: embedding, vocab_size: 37, d_model: 24, max_seq_len: 16}
  attn: {kind: attention, d_model: 36, n_layers: 1, n_heads: 3, max_seq_len: 16}
  head: {kind: decoding, d_model: 36, vocab_size: 37}
pathways:
  p: [embed, attn, head]
"""


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_valid_spec(capsys):
    code, out, err = _run(capsys, ["inspect", str(EXAMPLES / "tiny.yaml")])
    assert code == 0, err
    assert "contract OK" in out
    # embed: 257 x 128 token table + 256 x 128 position table.
    assert any(
        line.split()[:2] == ["embed", "embedding"] and "65,664" in line for line in out.splitlines()
    )
    assert "pathway tiny: embed -> attn-0 -> attn-1 -> head (max_seq_len 256)" in out
    assert "pathway tiny-shallow: embed -> attn-0 -> head" in out


@pytest.mark.parametrize(
    "text, words",
    [
        (BAD_SPEC, ["d_model mismatch", "'embed' outputs 24", "'attn' expects 36"]),
        ("modules: {embed: [\n", ["not valid YAML"]),
        (None, ["cannot read spec", "absent.yaml"]),
    ],
)
def test_inspect_invalid_spec_exits_2_with_one_line(capsys, tmp_path, text, words):
    path = tmp_path / "absent.yaml"
    if text is not None:
        path = tmp_path / "spec.yaml"
        path.write_text(text)
    code, out, err = _run(capsys, ["inspect", str(path)])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("pathways inspect: error: ")
    for w in words:
        assert w in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["inspect"])
    assert e.value.code == 2
    assert "spec" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained byte-level pathway saved the way training saves it."""
    spec = spec_lib.from_dict(
        {
            "modules": {
                "embed": {"kind": "embedding", "vocab_size": 257, "d_model": 24, "max_seq_len": 32},
                "attn": {
                    "kind": "attention",
                    "d_model": 24,
                    "n_layers": 1,
                    "n_heads": 3,
                    "max_seq_len": 32,
                    "init_std": 0.3,
                },
                "head": {"kind": "decoding", "d_model": 24, "vocab_size": 257, "init_std": 0.5},
            },
            "pathways": {"p": ["embed", "attn", "head"], "direct": ["embed", "head"]},
        }
    )
    out = tmp_path_factory.mktemp("ckpt")
    ex = LocalExecutor(spec, seed=4)
    ckpt.save_spec(out, spec, ByteTokenizer())
    for name in ("embed", "head"):
        ckpt.save_module(out, name, ex.state(name))
    return out, ex


def test_generate_from_a_checkpoint(capsys, checkpoint):
    out_dir, ex = checkpoint
    code, out, err = _run(
        capsys,
        [
            "generate",
            "--checkpoint",
            str(out_dir),
            "--pathway",
            "direct",
            "--prompt",
            "ab",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
        ],
    )
    assert code == 0, err
    [expected] = gen.generate(
        ex, "direct", ["ab"], ByteTokenizer(), SamplingParams(max_new_tokens=6)
    )
    assert out == "ab" + expected.text + "\n"


def test_generate_with_bfloat16_weights_and_a_bad_weights_value(capsys, checkpoint):
    out_dir, ex = checkpoint
    args = ["generate", "--checkpoint", str(out_dir), "--pathway", "direct", "--prompt", "ab"]
    args += ["--max-tokens", "6", "--temperature", "0"]
    code, out, err = _run(capsys, [*args, "--weights", "bfloat16"])
    assert code == 0, err
    half = LocalExecutor(ex.spec, {n: ex.state(n) for n in ("embed", "head")}, weights="bfloat16")
    [expected] = gen.generate(
        half, "direct", ["ab"], ByteTokenizer(), SamplingParams(max_new_tokens=6)
    )
    assert out == "ab" + expected.text + "\n"
    with pytest.raises(SystemExit) as exit_:
        _run(capsys, [*args, "--weights", "float16"])
    assert exit_.value.code == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_generate_without_the_pathways_weights_exits_2(capsys, checkpoint):
    out_dir, _ = checkpoint
    code, out, err = _run(
        capsys, ["generate", "--checkpoint", str(out_dir), "--pathway", "p", "--prompt", "ab"]
    )
    assert code == 2
    assert err.count("\n") == 1 and "no weights for module(s) attn of pathway 'p'" in err


def test_generate_refusing_the_prompt_prints_one_line(capsys, checkpoint):
    """A prompt the pathway cannot take (longer than its context) exits 2 with one error line
    and nothing on stdout (the prompt is echoed only with the first generated text)."""
    out_dir, ex = checkpoint
    too_long = "a" * (ex.spec.modules["embed"].max_seq_len + 1)
    argv = ["generate", "--checkpoint", str(out_dir), "--pathway", "direct", "--prompt", too_long]
    code, out, err = _run(capsys, argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "max sequence length exceeded" in err, err


def test_generate_from_a_non_checkpoint_exits_2(capsys, tmp_path):
    code, out, err = _run(capsys, ["generate", "--checkpoint", str(tmp_path), "--prompt", "a"])
    assert code == 2
    assert "is not a Pathways checkpoint" in err


@pytest.mark.parametrize("name, value", [("PATHWAYS_KERNELS", "bogus"), ("PATHWAYS_AMX", "x")])
def test_a_bad_backend_setting_is_one_line(capsys, checkpoint, monkeypatch, name, value):
    """The backends' settings are checked before the command runs (not at the first step that
    reads them, mid-generation)."""
    out_dir, _ = checkpoint
    monkeypatch.setenv(name, value)
    argv = ["generate", "--checkpoint", str(out_dir), "--pathway", "direct", "--prompt", "ab"]
    argv += ["--max-tokens", "4"]
    code, out, err = _run(capsys, argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and f"{name} must be one of" in err and repr(value) in err, err
