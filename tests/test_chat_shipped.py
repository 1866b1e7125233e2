"""The chat files shipped for the embedded teacher (distill/chat/) are what `llamba distill chat-data --ship`
produces: their keys match the teacher and the current settings and prompt sets, and sampling a slice again gives
the same text. Uses the real SmolLM2-135M-Instruct (installed by `make setup`)."""

from dataclasses import replace

import pytest
import torch

from llamba.distill import chat_prompts
from llamba.distill.chat_data import (
    ChatSettings,
    generate_records,
    read_records,
    shipped_path,
    teacher_fingerprint,
)
from llamba.distill.chat_eval import FACT_SETTINGS, OPEN_SETTINGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    from llamba.distill.teacher import TeacherError, load_teacher

    try:
        return load_teacher("default", torch.float32)
    except TeacherError as e:  # pragma: no cover - make setup installs it
        pytest.skip(str(e))


def shipped(teacher, settings):
    path = shipped_path(teacher_fingerprint(teacher[0]), settings)
    assert path.is_file(), (
        f"{path.name} is not shipped: the teacher, the settings or the prompt sets changed; "
        "rebuild with `llamba distill chat-data --ship`"
    )
    return read_records(path)


@pytest.mark.parametrize(
    "settings, n",
    [
        (ChatSettings(), ChatSettings().n),
        (FACT_SETTINGS, len(chat_prompts.FACT_EVAL)),
        (OPEN_SETTINGS, len(chat_prompts.OPEN_EVAL)),
    ],
)
def test_shipped_files_match_the_teacher_and_the_settings(teacher, settings, n):
    records = shipped(teacher, settings)
    assert len(records) == n and [r["id"] for r in records] == list(range(n))


def test_the_chat_data_command_reproduces_a_slice_of_the_shipped_corpus(teacher):
    torch.manual_seed(0)
    model, tok = teacher
    records = shipped(teacher, ChatSettings())
    # The first 24 tokens of the answers of conversations 3-6 (one per row generator: a slice does not depend on
    # the batch it was sampled in; float rounding may flip a token late in a long answer, not this early).
    short = replace(ChatSettings(), max_new_tokens=24)
    again = generate_records(model, tok, short, 3, 7, batch_size=4)
    for new, old in zip(again, records[3:7], strict=True):
        assert new["messages"][0] == old["messages"][0]
        assert old["messages"][1]["content"].startswith(new["messages"][1]["content"])
