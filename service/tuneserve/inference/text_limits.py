"""Size checks on request texts that run before any work on them."""

from __future__ import annotations

from tuneserve.errors import InvalidArgument

# No tokenizer turns more than this many characters into one token on real text: a text
# longer than limit * this is refused before it is tokenised (a 9 MB prompt otherwise takes
# seconds to tokenise only to be refused by the token limit).
MAX_CHARS_PER_TOKEN = 32


def check_text_size(text: str, max_tokens: int, *, field: str) -> None:
    """Refuse a text too long to be within `max_tokens`, before it is tokenised."""
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) > limit:
        raise InvalidArgument(
            f"{field}: {len(text)} characters is far over the limit of {max_tokens} tokens "
            f"(at most {limit} characters are read)",
            field=field,
        )
