"""Turning a growing list of token ids into text deltas, and finding stop sequences.

Text is only released once it is final: not while the last token ends in the middle of a
UTF-8 character, and not while its tail could still grow into a stop sequence.

Each step decodes a short window (the tokens since the last step, with the ones before
them for context, as vLLM and TGI do) rather than the whole sequence, so the cost per token
stays flat however long the generation gets."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase as Tokenizer


class IncrementalDecoder:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._emitted = 0  # characters of the text already released
        self._prefix = 0  # first token of the decoding window (context only)
        self._read = 0  # tokens whose text is already in self.text
        self.text = ""

    def push(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Take the ids so far; return (new final text, whether a stop sequence ended it)."""
        decode = self._tokenizer.decode
        window = str(decode(list(token_ids[self._prefix :]), skip_special_tokens=True))
        if window.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return "", False
        known = str(decode(list(token_ids[self._prefix : self._read]), skip_special_tokens=True))
        self._prefix, self._read = self._read, len(token_ids)
        text = self.text + window[len(known) :]
        self.text = text
        cut = self._earliest_stop(text)
        if cut is not None:
            self.text = text[:cut]
            return self._release(cut), True
        return self._release(len(text) - self._held_back(text)), False

    def flush(self) -> str:
        """Everything not yet released; call once generation has ended."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        delta = self.text[self._emitted : upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        return delta

    def _earliest_stop(self, text: str) -> int | None:
        # A stop sequence can only newly appear near the end of the text.
        window = max((len(s) for s in self._stop), default=0) + 16
        start = max(0, self._emitted - window)
        hits = [i for s in self._stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is the start of a stop sequence."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
