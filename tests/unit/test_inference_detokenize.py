"""tuneserve.inference.detokenize: incremental text release and stop sequences."""

from __future__ import annotations

from collections.abc import Sequence

from tuneserve.inference.detokenize import IncrementalDecoder


class FakeTokenizer:
    """Token id i decodes to pieces[i]; pieces may be bytes, to split UTF-8 characters."""

    def __init__(self, pieces: Sequence[str | bytes]) -> None:
        self.pieces = pieces

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raw = [self.pieces[i] for i in token_ids]
        if raw and isinstance(raw[0], bytes):
            return b"".join(raw).decode("utf-8", errors="replace")  # type: ignore[arg-type]
        return "".join(raw)  # type: ignore[arg-type]


def run(pieces: Sequence[str | bytes], stop: Sequence[str] = ()) -> tuple[list[str], bool, str]:
    """Push one token at a time as generation would; stop at the first stop sequence."""
    decoder = IncrementalDecoder(FakeTokenizer(pieces), stop)  # type: ignore[arg-type]
    deltas = []
    for n in range(1, len(pieces) + 1):
        delta, stopped = decoder.push(list(range(n)))
        deltas.append(delta)
        if stopped:
            return deltas, True, decoder.text
    deltas.append(decoder.flush())
    return deltas, False, decoder.text


def test_text_is_released_as_it_comes_without_stop_sequences() -> None:
    deltas, stopped, text = run(["Hello", ",", " world"])
    assert deltas == ["Hello", ",", " world", ""]
    assert not stopped
    assert text == "Hello, world"


def test_stop_sequence_cuts_the_text_and_is_excluded() -> None:
    deltas, stopped, text = run(["Answer: yes", "\n", "User", ":", " more"], stop=["\nUser:"])
    assert stopped
    assert "".join(deltas) == "Answer: yes"
    assert text == "Answer: yes"
    assert len(deltas) == 4  # it ended on the token that completed the stop sequence


def test_stop_sequence_inside_one_token_drops_the_rest_of_the_token() -> None:
    deltas, stopped, text = run(["ab", "c###d", "e"], stop=["###"])
    assert stopped
    assert deltas == ["ab", "c"]
    assert text == "abc"


def test_earliest_of_several_stop_sequences_wins() -> None:
    deltas, stopped, _ = run(["one", " END two STOP"], stop=["STOP", "END"])
    assert stopped
    assert "".join(deltas) == "one "


def test_possible_start_of_a_stop_sequence_is_held_back_then_released() -> None:
    deltas, stopped, text = run(["ab", "#", "#", "c"], stop=["###"])
    assert not stopped
    assert deltas == ["ab", "", "", "##c", ""]
    assert text == "ab##c"


def test_held_back_text_that_becomes_a_stop_sequence_is_never_released() -> None:
    deltas, stopped, text = run(["ab", "#", "#", "#", "c"], stop=["###"])
    assert stopped
    assert deltas == ["ab", "", "", ""]
    assert text == "ab"


def test_flush_releases_a_held_tail_when_generation_ends() -> None:
    deltas, stopped, _ = run(["ab", "##"], stop=["###"])
    assert not stopped
    assert deltas == ["ab", "", "##"]


def test_incomplete_utf8_character_is_held_until_complete() -> None:
    e_acute = "\u00e9".encode()  # two bytes
    deltas, stopped, text = run([b"caf", e_acute[:1], e_acute[1:], b"!"])
    assert not stopped
    assert deltas == ["caf", "", "\u00e9", "!", ""]
    assert all("\ufffd" not in d for d in deltas)
    assert text == "caf\u00e9!"


def test_stop_sequence_found_across_many_pushes_of_long_text() -> None:
    pieces = ["x" * 50] * 5 + ["</s", "top>", "after"]
    deltas, stopped, text = run(pieces, stop=["</stop>"])
    assert stopped
    assert text == "x" * 250
    assert "".join(deltas) == "x" * 250
