"""Incremental detokenization and stop strings, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from workers import LoadedModel
from workers.text import IncrementalDetokenizer, StopMatcher


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii text",
        "Größe über straße",
        "東京と大阪の天気",
        "emoji 🎉🚀 and ñ",
        " leading spaces",
    ],
)
def test_deltas_concatenate_to_the_full_decode_and_never_split_a_character(
    smollm: LoadedModel, text: str
) -> None:
    tokenizer = smollm.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0xFFFF or c >= "\u3040" for c in text):
        assert len(ids) > sum(bool(d) for d in deltas)  # some tokens were half a character


def test_stop_string_across_token_boundaries_releases_nothing_past_it() -> None:
    matcher = StopMatcher(["o W"])
    assert matcher.feed("Hel") == "Hel"
    assert matcher.feed("lo") == "l"  # "o" may begin the stop string: held
    assert matcher.feed(" Wor") == ""
    assert matcher.stopped
    assert matcher.feed("ld") == ""


def test_held_text_that_never_becomes_a_stop_is_released() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("a </e") == "a "
    assert matcher.feed("xit") == "</exit"
    assert matcher.feed("</") == ""
    assert matcher.flush() == "</"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.stopped


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("anything") == "anything"
    assert matcher.flush() == ""
