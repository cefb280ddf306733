"""Chat templates: rendering, the checks naming the field, and the checkpoint file round trip."""

from __future__ import annotations

import pytest

from pathways import chat


def test_default_template_renders_roles_in_order():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert chat.DEFAULT.render(msgs) == "S\n\nUser: ab\nAssistant: c\nUser: d\nAssistant:"


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "user", "content": "x"}, "y"], "messages[1]"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
    ],
)
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(chat.ChatError) as e:
        chat.DEFAULT.render(messages)
    assert e.value.param == param


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    assert chat.load(tmp_path) is None
    t = chat.ChatTemplate({"user": "<u>{content}</u>"}, "<a>", ("</a>",))
    chat.save(tmp_path, t)
    assert chat.load(tmp_path) == t
    (tmp_path / chat.FILE).write_text('{"roles": {"user": "no placeholder"}}')
    with pytest.raises(chat.ChatError, match="user"):
        chat.load(tmp_path)
    (tmp_path / chat.FILE).write_text("{")
    with pytest.raises(chat.ChatError, match=chat.FILE):
        chat.load(tmp_path)


def test_unknown_template_fields_are_named():
    data = {"roles": {"user": "U: {content}"}, "stops": [], "colour": "red"}
    with pytest.raises(chat.ChatError, match=r"chat template: unknown field\(s\) colour, stops"):
        chat.ChatTemplate.from_dict(data)
