"""Generation requests and their checks: the sampling and stopping parameters TGI, vLLM and
LoRAX expose, with the limits this server enforces. No torch here."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass

from tuneserve.errors import InvalidArgument, collect


class FinishReason(str, enum.Enum):
    EOS = "EOS"
    LENGTH = "LENGTH"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_new_tokens: int = 0  # 0: the server's default
    greedy: bool = False
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    no_repeat_ngram_size: int = 0  # 0: off
    seed: int | None = None  # None: the server picks one and reports it
    stop: tuple[str, ...] = ()

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    prompt: str
    adapter_id: str = ""  # empty: the base model
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True, kw_only=True)
class GenerationChunk:
    """New text since the last chunk; the last chunk has `finish_reason` set."""

    text: str
    generated_tokens: int
    prompt_tokens: int
    seed: int
    finish_reason: FinishReason | None = None


def resolve_params(
    params: SamplingParams, *, default_max_new_tokens: int, max_new_tokens: int
) -> SamplingParams:
    """Every problem at once; defaults filled in and a seed chosen."""
    problems: list[InvalidArgument] = []

    def check(ok: bool, name: str, message: str) -> None:
        if not ok:
            field = f"parameters.{name}"
            problems.append(InvalidArgument(f"{field}: {message}", field=field))

    p = params
    check(
        0 <= p.max_new_tokens <= max_new_tokens,
        "max_new_tokens",
        f"{p.max_new_tokens} is over this server's limit of {max_new_tokens}",
    )
    check(0 <= p.temperature <= 100, "temperature", f"{p.temperature} is not in [0, 100]")
    check(0 <= p.top_k <= 1_000_000, "top_k", "must not be negative")
    check(0 < p.top_p <= 1, "top_p", f"{p.top_p} is not in (0, 1]")
    check(
        0 < p.repetition_penalty <= 100,
        "repetition_penalty",
        f"{p.repetition_penalty} is not in (0, 100]",
    )
    check(0 <= p.no_repeat_ngram_size <= 1024, "no_repeat_ngram_size", "is out of range")
    check(p.seed is None or 0 <= p.seed < 2**63, "seed", "is out of range")
    check(len(p.stop) <= 16, "stop", "at most 16 stop sequences")
    for i, s in enumerate(p.stop):
        check(0 < len(s) <= 256, f"stop[{i}]", "must be 1 to 256 characters")
    collect(problems)
    return SamplingParams(
        max_new_tokens=p.max_new_tokens or default_max_new_tokens,
        greedy=p.is_greedy,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        repetition_penalty=p.repetition_penalty,
        no_repeat_ngram_size=p.no_repeat_ngram_size,
        seed=p.seed if p.seed is not None else secrets.randbits(63),
        stop=p.stop,
    )
