"""Tests for the pathway spec: valid files load; each contract error names modules and values."""

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from pathways import spec as spec_lib
from pathways.modules import AttentionConfig
from pathways.spec import SpecError

# The repository's examples/ (a `resources` dependency in BUILD puts them in the test sandbox).
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

VALID = """
tokenizer: {kind: byte}
modules:
  embed: {kind: embedding, vocab_size: 37, d_model: 24, max_seq_len: 32}
  lower: {kind: attention, d_model: 24, n_layers: 5, n_heads: 3, max_seq_len: 32}
  upper: {kind: attention, d_model: 24, n_layers: 1, n_heads: 3, max_seq_len: 16}
  head: {kind: decoding, d_model: 24, vocab_size: 37}
pathways:
  full: [embed, lower, upper, head]
  shallow: [embed, lower, head]
  short: {modules: [embed, head], max_seq_len: 20}
"""


def _data(text=VALID):
    return yaml.safe_load(text)


def _load_text(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return spec_lib.load(path)


def test_valid_spec_loads_with_pathways_sharing_modules(tmp_path):
    spec = _load_text(tmp_path, VALID)
    assert list(spec.modules) == ["embed", "lower", "upper", "head"]
    assert spec.modules["lower"] == AttentionConfig(
        d_model=24, n_layers=5, n_heads=3, max_seq_len=32
    )
    assert spec.pathway("full").modules == ("embed", "lower", "upper", "head")
    assert spec.pathway("shallow").modules == ("embed", "lower", "head")
    # Both pathways refer to the same `lower` module (shared, not copied).
    assert set(spec.pathway("full").modules) & set(spec.pathway("shallow").modules) == {
        "embed",
        "lower",
        "head",
    }
    # The chain's limit is its smallest module limit; a declared smaller one wins.
    assert spec.pathway("full").max_seq_len == 16
    assert spec.pathway("shallow").max_seq_len == 32
    assert spec.pathway("short").max_seq_len == 20
    assert spec.default_pathway == "full"
    assert spec.tokenizer == {"kind": "byte"}


def test_examples_load():
    tiny = spec_lib.load(EXAMPLES / "tiny.yaml")
    assert tiny.pathway("tiny").modules == ("embed", "attn-0", "attn-1", "head")
    assert tiny.pathway("tiny-shallow").modules == ("embed", "attn-0", "head")
    gpt2 = spec_lib.load(EXAMPLES / "gpt2-small.yaml")
    assert gpt2.pathway("gpt2-small").max_seq_len == 1024


def test_dump_and_load_round_trip(tmp_path):
    spec = spec_lib.from_dict(_data())
    spec.dump(tmp_path / "out.yaml")
    again = spec_lib.load(tmp_path / "out.yaml")
    assert again.modules == spec.modules
    assert again.pathways == spec.pathways


def test_with_and_without_pathway():
    spec = spec_lib.from_dict(_data())
    added = spec.with_pathway("upper-only", ["embed", "upper", "head"])
    assert added.pathway("upper-only").max_seq_len == 16
    assert "upper-only" not in spec.pathways  # the original is unchanged
    assert "shallow" not in spec.without_pathway("shallow").pathways
    with pytest.raises(SpecError, match="pathway 'bad': unknown module 'middle'"):
        spec.with_pathway("bad", ["embed", "middle", "head"])
    with pytest.raises(SpecError, match="unknown pathway 'nope'"):
        spec.without_pathway("nope")


def test_only_keeps_one_pathway_and_its_modules():
    spec = spec_lib.load(EXAMPLES / "multitask.yaml")
    name = next(n for n in spec.pathways if len(spec.pathway(n).modules) < len(spec.modules))
    one = spec.only(name)
    assert list(one.pathways) == [name] and one.pathways[name] == spec.pathways[name]
    assert list(one.modules) == [m for m in spec.modules if m in spec.pathway(name).modules]
    assert all(one.modules[m] == spec.modules[m] for m in one.modules)
    assert spec_lib.from_dict(one.to_dict()) == one  # still a valid spec
    with pytest.raises(SpecError, match="unknown pathway 'nope'"):
        spec.only("nope")


def test_a_pathway_declares_a_dipaco_grid():
    data = _data()
    data["pathways"]["full"] = {"modules": ["embed", "lower", "upper", "head"]}
    data["pathways"]["full"]["grid"] = {"upper": 2, "lower": 3}
    spec = spec_lib.from_dict(data)
    assert spec.pathway("full").grid == (("upper", 2), ("lower", 3))  # in the order given
    assert spec.pathway("shallow").grid == ()
    assert spec_lib.from_dict(spec.to_dict()) == spec
    for grid, words in [
        ({"middle": 2}, "pathway 'full': grid names 'middle', which is not in the pathway"),
        ({"upper": 0}, "pathway 'full': grid['upper'] must be an integer >= 1, got 0"),
        ({"upper": True}, "grid['upper'] must be an integer >= 1, got True"),
        ([2], "pathway 'full': grid must map modules of the pathway to their number of choices"),
    ]:
        data["pathways"]["full"]["grid"] = grid
        with pytest.raises(SpecError, match=re.escape(words)):
            spec_lib.from_dict(data)


def _error(mutate) -> str:
    data = _data()
    mutate(data)
    with pytest.raises(SpecError) as e:
        spec_lib.from_dict(data)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_d_model_mismatch_names_both_modules_and_sizes():
    def mutate(d):
        d["modules"]["upper"] = {
            "kind": "attention",
            "d_model": 36,
            "n_layers": 1,
            "n_heads": 3,
            "max_seq_len": 16,
        }
        d["pathways"] = {"p": ["embed", "lower", "upper", "head"]}

    msg = _error(mutate)
    assert "pathway 'p'" in msg and "d_model mismatch" in msg
    assert "'lower' outputs 24" in msg and "'upper' expects 36" in msg


def test_vocab_mismatch_names_embedding_decoding_and_sizes():
    def mutate(d):
        d["modules"]["head"]["vocab_size"] = 41

    msg = _error(mutate)
    assert "vocab mismatch" in msg
    assert "'embed'" in msg and "37" in msg and "'head'" in msg and "41" in msg


def test_unknown_module():
    def mutate(d):
        d["pathways"]["full"] = ["embed", "lower", "middle", "head"]

    msg = _error(mutate)
    assert "pathway 'full'" in msg and "unknown module 'middle'" in msg
    assert "embed, lower, upper, head" in msg  # lists the known ones


def test_must_start_with_embedding():
    def mutate(d):
        d["pathways"]["full"] = ["lower", "head"]

    msg = _error(mutate)
    assert "pathway 'full'" in msg and "must start with an embedding" in msg
    assert "'lower' is attention" in msg


def test_must_end_with_decoding():
    def mutate(d):
        d["pathways"]["full"] = ["embed", "lower"]

    msg = _error(mutate)
    assert "pathway 'full'" in msg and "must end with a decoding" in msg
    assert "'lower' is attention" in msg


def test_duplicate_module():
    def mutate(d):
        d["pathways"]["full"] = ["embed", "lower", "lower", "head"]

    msg = _error(mutate)
    assert "pathway 'full'" in msg and "'lower' appears more than once" in msg


def test_max_sequence_length_exceeded():
    def mutate(d):
        d["pathways"]["full"] = {"modules": ["embed", "lower", "upper", "head"], "max_seq_len": 24}

    msg = _error(mutate)
    assert "pathway 'full'" in msg and "max sequence length exceeded" in msg
    assert "24" in msg and "'upper'" in msg and "16" in msg


def test_wrong_neighbour_kinds():
    def mutate(d):
        d["pathways"]["full"] = ["embed", "embed2", "head"]
        d["modules"]["embed2"] = {
            "kind": "embedding",
            "vocab_size": 37,
            "d_model": 24,
            "max_seq_len": 32,
        }

    msg = _error(mutate)
    assert (
        "'embed' (embedding) outputs hidden" in msg and "'embed2' (embedding) expects tokens" in msg
    )


def test_unknown_field_names_module_and_field():
    def mutate(d):
        d["modules"]["lower"]["n_head"] = 3

    msg = _error(mutate)
    assert "module 'lower'" in msg and "n_head" in msg


def test_bad_field_value_names_module_field_and_value():
    def mutate(d):
        d["modules"]["lower"]["n_heads"] = 5

    msg = _error(mutate)
    assert "module 'lower'" in msg and "n_heads (5)" in msg and "d_model (24)" in msg


def test_a_number_yaml_reads_as_a_string_is_named(tmp_path):
    # YAML 1.1 reads `1e-5` (no dot) as the string "1e-5".
    text = VALID.replace(
        "n_heads: 3, max_seq_len: 16}", "n_heads: 3, max_seq_len: 16, norm_eps: 1e-5}"
    )
    with pytest.raises(SpecError) as e:
        _load_text(tmp_path, text)
    assert str(e.value) == "module 'upper': norm_eps must be a positive number, got '1e-5'"


def test_unknown_kind_and_top_level_key():
    def kind(d):
        d["modules"]["lower"]["kind"] = "transformer"

    msg = _error(kind)
    assert "module 'lower'" in msg and "'transformer'" in msg

    def key(d):
        d["layers"] = 3

    assert "unknown top-level key(s) layers" in _error(key)


def test_bad_tokenizer_kind():
    def mutate(d):
        d["tokenizer"] = {"kind": "sentencepiece"}

    assert "sentencepiece" in _error(mutate)


def test_unknown_pathway_lookup():
    spec = spec_lib.from_dict(_data())
    with pytest.raises(SpecError, match="unknown pathway 'deep'; known: full, shallow, short"):
        spec.pathway("deep")


def test_bad_yaml_names_the_file(tmp_path):
    with pytest.raises(SpecError) as e:
        _load_text(tmp_path, "modules: [embed\npathways: {")
    assert "not valid YAML" in str(e.value) and "spec.yaml" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(SpecError) as e:
        spec_lib.load(tmp_path / "absent.yaml")
    assert "cannot read spec" in str(e.value) and "absent.yaml" in str(e.value)


def test_not_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="top level must be a mapping"):
        _load_text(tmp_path, "- embed\n- head\n")


@pytest.mark.parametrize("where", ["module", "pathway"])
def test_names_that_could_leave_a_checkpoint_are_refused(where):
    data = {
        "modules": {
            "embed": {"kind": "embedding", "vocab_size": 7, "d_model": 8, "max_seq_len": 8},
            "head": {"kind": "decoding", "vocab_size": 7, "d_model": 8},
        },
        "pathways": {"p": ["embed", "head"]},
    }
    if where == "module":
        data["modules"]["../../victim"] = data["modules"].pop("head")
        data["pathways"]["p"] = ["embed", "../../victim"]
    else:
        data["pathways"]["a/b"] = data["pathways"].pop("p")
    with pytest.raises(
        spec_lib.SpecError, match=f"{where} name must match .*got '(\\.\\./\\.\\./victim|a/b)'"
    ):
        spec_lib.from_dict(data)


# A vision pathway beside the text one, sharing the attention module `lower`.
VISION = {
    "patches": {
        "kind": "image_embedding",
        "image_size": 8,
        "channels": 1,
        "patch_size": 2,
        "d_model": 24,
    },
    "classes": {"kind": "classification", "d_model": 24, "n_classes": 10},
}


def _vision_error(pathway, **modules) -> str:
    def mutate(d):
        d["modules"].update(VISION)
        d["modules"].update(modules)
        d["pathways"] = {"v": pathway}

    return _error(mutate)


def test_vision_pathway_shares_attention_and_is_bidirectional():
    d = _data()
    d["modules"].update(VISION)
    d["pathways"]["digits"] = ["patches", "lower", "classes"]
    d["pathways"]["causal-digits"] = {"modules": ["patches", "lower", "classes"], "mask": "causal"}
    d["pathways"]["text-both-ways"] = {
        "modules": ["embed", "lower", "head"],
        "mask": "bidirectional",
    }
    spec = spec_lib.from_dict(d)
    assert spec.pathway("digits").causal is False  # images default to bidirectional
    assert spec.pathway("full").causal is True  # text defaults to causal
    assert spec.pathway("causal-digits").causal is True
    assert spec.pathway("text-both-ways").causal is False
    assert spec.pathway("digits").max_seq_len == 16  # (8 / 2) ** 2 patches
    again = spec_lib.from_dict(spec.to_dict())  # declared masks survive a checkpoint's spec
    assert again.pathways == spec.pathways
    assert "mask" not in spec.to_dict()["pathways"]["digits"]  # the default is not written


def test_vision_embedding_width_mismatch_names_modules_and_sizes():
    wide = dict(VISION["patches"], d_model=36)
    msg = _vision_error(["patches", "lower", "classes"], patches=wide)
    assert "pathway 'v'" in msg and "d_model mismatch" in msg
    assert "'patches' outputs 36" in msg and "'lower' expects 24" in msg


def test_vision_embedding_only_before_hidden_modules():
    msg = _vision_error(["embed", "patches", "lower", "classes"])
    assert "'embed' (embedding) outputs hidden" in msg
    assert "'patches' (image_embedding) expects image" in msg


def test_patches_must_fit_the_attention_max_seq_len():
    msg = _vision_error(
        ["patches", "upper", "classes"], patches=dict(VISION["patches"], patch_size=1)
    )
    assert "sequence length mismatch" in msg
    assert "'patches' (image_embedding) outputs 64 positions" in msg
    assert "'upper' has max_seq_len 16" in msg


def test_next_token_head_needs_tokens():
    msg = _vision_error(["patches", "lower", "head"])
    assert "'head' (decoding) predicts next tokens" in msg
    assert "'patches' (image_embedding) reads image, not tokens" in msg


def test_classification_head_width_mismatch():
    msg = _vision_error(
        ["patches", "lower", "classes"], classes=dict(VISION["classes"], d_model=12)
    )
    assert (
        "d_model mismatch" in msg and "'lower' outputs 24" in msg and "'classes' expects 12" in msg
    )


def test_unknown_mask_names_the_allowed_ones():
    msg = _vision_error({"modules": ["patches", "lower", "classes"], "mask": "sideways"})
    assert "pathway 'v'" in msg and "mask must be one of causal, bidirectional" in msg
    assert "'sideways'" in msg


def test_ending_without_a_head_lists_the_heads():
    msg = _vision_error(["patches", "lower"])
    assert "must end with a decoding module or another head" in msg
    assert "classification" in msg and "'lower' is attention" in msg


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"patch_size": 3}, ["patch_size (3) must divide image_size (8)"]),
        ({"channels": 0}, ["channels must be a positive integer, got 0"]),
    ],
)
def test_image_embedding_config_errors_name_field_and_value(fields, words):
    msg = _vision_error(["patches", "lower", "classes"], patches=dict(VISION["patches"], **fields))
    assert "module 'patches'" in msg
    for w in words:
        assert w in msg
