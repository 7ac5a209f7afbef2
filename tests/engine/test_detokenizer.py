"""Incremental detokenization and stop strings, against the tiny byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from shared.detokenizer import IncrementalDetokenizer, StopMatch, StopStringMatcher

TEXTS = [
    "héllo wörld 你好 🙂",
    "Emoji: 🚀 ✅ ❤️ 𝄞 ﷽ and “quotes” — dashes.",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "The answer is 42. STOP here",
]


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(tok, PreTrainedTokenizerBase)
    return tok


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert isinstance(ids, list)
    return ids


def stream(detok: IncrementalDetokenizer, chunks: Sequence[Sequence[int]]) -> list[str]:
    return [detok.add(chunk) for chunk in chunks]


# ---- incremental detokenization --------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_at_a_time_reproduces_text(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, [[i] for i in ids])
    assert "".join(deltas) == text  # complete characters only: nothing held at the end
    assert detok.flush() == ""
    assert detok.output_text == text and detok.text == text
    assert all("\ufffd" not in d for d in deltas)


def test_split_character_is_held_then_released(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "ok 你好"
    ids = encode(tokenizer, text)
    # The tokenizer splits these CJK characters into byte tokens that do not decode alone.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = stream(detok, [[i] for i in ids])
    assert "" in deltas  # something was held back ...
    assert "".join(deltas) == text  # ... and released, whole
    # While held, `text` shows the partial tail and `output_text` does not.
    detok = IncrementalDetokenizer(tokenizer)
    for i in ids:
        if detok.add([i]) == "" and detok.text != detok.output_text:
            assert detok.text.endswith("\ufffd")
            break
    else:
        pytest.fail("no token was held back")


def test_flush_releases_an_incomplete_tail(tokenizer: PreTrainedTokenizerBase) -> None:
    first_byte = encode(tokenizer, "🙂")[:1]  # the emoji alone is split into byte tokens
    assert tokenizer.decode(first_byte) == "\ufffd"
    cut = encode(tokenizer, "a b") + first_byte
    detok = IncrementalDetokenizer(tokenizer)
    emitted = "".join(stream(detok, [[i] for i in cut]))
    full = str(tokenizer.decode(cut))
    assert full.endswith("\ufffd") and not emitted.endswith("\ufffd")
    assert emitted + detok.flush() == full
    assert detok.output_text == full


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int)
    ids = [*encode(tokenizer, "hi 你"), eos, *encode(tokenizer, "好 there"), eos]
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    out = "".join(stream(detok, [[i] for i in ids])) + detok.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|end_of_text|>" in out) == (not skip)


def test_prompt_context_is_not_emitted(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = encode(tokenizer, "Question: héllo?")
    out_ids = encode(tokenizer, " wörld 🙂")
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(stream(detok, [[i] for i in out_ids])) + detok.flush() == " wörld 🙂"
    assert detok.output_ids == out_ids


class CountingTokenizer:
    """Delegates to a real tokenizer, recording how many ids each decode call receives."""

    def __init__(self, inner: PreTrainedTokenizerBase) -> None:
        self.inner = inner
        self.window_sizes: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.window_sizes.append(len(ids))
        return str(self.inner.decode(ids, **kwargs))


def test_decodes_a_small_window_not_the_history(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, " ".join(TEXTS) * 4)
    assert len(ids) > 300
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)  # type: ignore[arg-type]
    out = "".join(stream(detok, [[i] for i in ids]))
    assert out == tokenizer.decode(ids)
    # A window spans the previous emit and any held-back bytes of one character (<= 4 tokens).
    assert max(counting.window_sizes) <= 8


@settings(max_examples=150, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_random_ids_in_random_chunks_match_full_decode(
    tokenizer: PreTrainedTokenizerBase, data: st.DataObject, skip: bool
) -> None:
    vocab = len(tokenizer)
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)), label="chunk sizes")
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    pos, deltas = 0, []
    for size in sizes:
        if pos >= len(ids):
            break
        deltas.append(detok.add(ids[pos : pos + size]))
        pos += size
        # At every step, emitted + held is exactly the decode of everything so far.
        assert detok.text == tokenizer.decode(ids[:pos], skip_special_tokens=skip)
    assert "".join(deltas) + detok.flush() == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_stock_fast_tokenizer_is_decoded_by_its_backend(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny BPE tokenizer's wrapper adds nothing to its backend's decode: the detokenizer
    # skips the wrapper, and the text is still the wrapper's.
    ids = encode(tokenizer, TEXTS[1])
    expected = tokenizer.decode(ids)

    def wrapper(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("the transformers wrapper was called")

    monkeypatch.setattr(tokenizer, "decode", wrapper)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(detok, [[i] for i in ids])) + detok.flush() == expected


def test_a_clean_up_pass_keeps_the_wrapper() -> None:
    # A WordPiece tokenizer whose decode cleans up spaces before punctuation: that pass is the
    # wrapper's, so the detokenizer must go through it to stream the same text.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", ",", "world", ".", "do", "n't", "!"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=False)  # the clean-up is left to the wrapper
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", clean_up_tokenization_spaces=True
    )
    ids = [vocab[w] for w in ["hello", ",", "world", ".", "do", "n't", "!"]]
    expected = tok.decode(ids)
    assert expected != backend.decode(ids)  # the clean-up changed something
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, [[i] for i in ids])) + detok.flush() == expected


# ---- stop strings: the matcher ---------------------------------------------------------------


def test_find_earliest_start_and_shortest_on_tie() -> None:
    m = StopStringMatcher(["abcd", "bc", "xyz"])
    match = m.find("..abcd..")
    assert match == StopMatch(2, "abcd") and match.end == 6
    assert m.find("..abc") == StopMatch(3, "bc")
    assert StopStringMatcher(["ab", "abc"]).find("abc") == StopMatch(0, "ab")
    assert StopStringMatcher(["abc", "ab"]).find("abc") == StopMatch(0, "ab")
    assert m.find("no stop here") is None


def test_find_scans_only_what_can_be_new() -> None:
    m = StopStringMatcher(["STOP"])
    text = "STOP? not again: ST" + "OP"
    # The caller promises text[:18] held no complete stop; one straddling the boundary counts.
    assert m.find(text, checked_len=18) == StopMatch(17, "STOP")
    # A stop wholly inside the checked prefix is not looked for again.
    assert m.find("xSTOPxx", checked_len=7) is None
    assert m.find("xSTOPxx", checked_len=4) == StopMatch(1, "STOP")  # ends after 4


def test_safe_len_holds_back_possible_stop_prefixes() -> None:
    m = StopStringMatcher(["world!", "ab"])
    assert m.safe_len("hello wor") == len("hello ")
    assert m.safe_len("hello world") == len("hello ")
    assert m.safe_len("hello world?") == len("hello world?")
    assert m.safe_len("xa") == 1
    assert m.safe_len("") == 0
    # The longest candidate suffix wins over a shorter one.
    m2 = StopStringMatcher(["aab", "ab"])
    assert m2.safe_len("xaa") == 1
    assert StopStringMatcher([]).safe_len("anything") == len("anything")


def test_find_reports_only_matches_ending_past_the_checked_text() -> None:
    """Even a short stop wholly inside the checked text is not reported (the text of a request
    short of its min_new_tokens is checked without stopping); one ending past it is."""
    matcher = StopStringMatcher(["ab", "xxxxx"])
    assert matcher.find("zabzz", 3) is None
    assert matcher.find("zabzz", 2) == StopMatch(1, "ab")  # ends at 3, past 2
    assert matcher.find("zabzab", 3) == StopMatch(4, "ab")


def test_empty_stop_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


# ---- stop strings: streaming through the tokenizer -------------------------------------------


def stream_with_stops(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], stops: list[str], no_stop_trim: bool = False
) -> tuple[list[str], str, StopMatch | None]:
    """The engine's per-token loop: decode, look for a stop, stream only the safe prefix.

    Returns the chunks streamed after each token, the final text and the stop that ended it.
    """
    detok = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(stops)
    streamed, checked, chunks = 0, 0, []
    for token in ids:
        detok.add([token])
        text = detok.output_text
        hit = matcher.find(text, checked)
        checked = len(text)
        if hit is not None:
            end = hit.end if no_stop_trim else hit.start
            assert streamed <= hit.start  # nothing of the stop string ever went out
            chunks.append(text[streamed:end])
            return chunks, text[:end], hit
        safe = matcher.safe_len(text)
        chunks.append(text[streamed:safe])
        streamed = safe
    text = detok.output_text + detok.flush()
    chunks.append(text[streamed:])
    return chunks, text, None


def test_stop_string_split_over_tokens_is_cut_exactly(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "The answer is 42. STOP here"
    ids = encode(tokenizer, text)
    assert len(encode(tokenizer, "STOP")) > 1  # the stop string spans several tokens
    chunks, final, hit = stream_with_stops(tokenizer, ids, ["STOP"])
    assert final == "The answer is 42. " and "".join(chunks) == final
    assert hit == StopMatch(len("The answer is 42. "), "STOP")
    chunks, final, _ = stream_with_stops(tokenizer, ids, ["STOP"], no_stop_trim=True)
    assert final == "The answer is 42. STOP" and "".join(chunks) == final


def test_stop_inside_a_token_and_multibyte_stop(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "héllo wörld 你好 🙂"
    ids = encode(tokenizer, text)
    # "ll" lives inside one token; the text is cut in the middle of that token's text.
    _, final, hit = stream_with_stops(tokenizer, ids, ["ll"])
    assert final == "hé" and hit == StopMatch(2, "ll")
    # A stop made of byte-split characters.
    _, final, _ = stream_with_stops(tokenizer, ids, ["好 🙂"])
    assert final == "héllo wörld 你"


def test_overlapping_stops_pick_the_earliest(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode(tokenizer, "héllo wörld 你好 🙂")
    _, final, hit = stream_with_stops(tokenizer, ids, ["你好", "wörld 你", "ld"])
    # "ld" completes first (earliest start among complete matches once it arrives).
    assert final == "héllo wör" and hit is not None and hit.stop == "ld"
    _, final, hit = stream_with_stops(tokenizer, ids, ["o wö", "wörld"])
    assert final == "héll" and hit is not None and hit.stop == "o wö"


def test_held_text_is_released_when_the_stop_does_not_materialise(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = "héllo wörld 你好 🙂"
    ids = encode(tokenizer, text)
    chunks, final, hit = stream_with_stops(tokenizer, ids, ["wörld!", "🙂🙂"])
    assert hit is None and final == text and "".join(chunks) == text
    # While "wörld" could still become "wörld!", none of it was streamed.
    streamed = ""
    for chunk in chunks:
        streamed += chunk
        assert not streamed.endswith(("w", "wö", "wör", "wörl", "wörld"))
    # The trailing "🙂" (a prefix of "🙂🙂") is only released by the final flush.
    assert chunks[-1].endswith("🙂")
