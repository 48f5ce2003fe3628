"""Generation requests and their checks: the sampling and stopping parameters TGI, vLLM and
LoRAX expose, with the limits this server enforces. No torch here."""

from __future__ import annotations

import enum
import math
import secrets
import struct
from dataclasses import dataclass

from tuneserve.errors import InvalidArgument, collect

# Below these, scores divided by the temperature or the penalty overflow float32 for logits
# far smaller than a model's (a temperature of 1e-40 turns any logit above 3.4e-2 into
# infinity, and the row's sampling into NaN). vLLM raises temperatures below 1e-2 to 1e-2;
# here they are refused, so a caller who wants greedy decoding says so (temperature 0).
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


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
    check(p.max_new_tokens >= 0, "max_new_tokens", f"{p.max_new_tokens} is negative")
    check(
        p.max_new_tokens <= max_new_tokens,
        "max_new_tokens",
        f"{p.max_new_tokens} is over this server's limit of {max_new_tokens}",
    )
    # NaN fails every range check below (each comparison with NaN is False); the message
    # then says it is not a number rather than that it is out of range.
    check(
        p.temperature == 0
        or (_at_least(p.temperature, MIN_TEMPERATURE) and p.temperature <= MAX_TEMPERATURE),
        "temperature",
        _temperature_problem(p.temperature),
    )
    check(0 <= p.top_k <= 1_000_000, "top_k", f"{p.top_k} is not in [0, 1000000]")
    check(0 < p.top_p <= 1, "top_p", _not_finite(p.top_p) or f"{p.top_p} is not in (0, 1]")
    check(
        _at_least(p.repetition_penalty, MIN_REPETITION_PENALTY)
        and p.repetition_penalty <= MAX_REPETITION_PENALTY,
        "repetition_penalty",
        _not_finite(p.repetition_penalty)
        or f"{p.repetition_penalty} is not in [{MIN_REPETITION_PENALTY}, "
        f"{MAX_REPETITION_PENALTY:g}] (1 is off)",
    )
    check(
        0 <= p.no_repeat_ngram_size <= 1024,
        "no_repeat_ngram_size",
        f"{p.no_repeat_ngram_size} is not in [0, 1024]",
    )
    check(
        p.seed is None or 0 <= p.seed <= MAX_SEED,
        "seed",
        f"{p.seed} is not between 0 and 2**63-1 ({MAX_SEED})",
    )
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


def _at_least(value: float, floor: float) -> bool:
    """`value >= floor`, the floor as a float32 holds it counting too: the API's fields are
    float32, so 0.01 arrives as 0.0099999998, and a caller who sends the floor itself must
    not be refused. False for NaN."""
    (floor32,) = struct.unpack("f", struct.pack("f", floor))
    return value >= min(floor, floor32)


def _temperature_problem(t: float) -> str:
    """Why temperature `t` is refused; a tiny one gets the way to what it likely meant."""
    if not math.isfinite(t):
        return _not_finite(t)
    message = f"{t} is not 0 or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}]"
    if 0 < t < MIN_TEMPERATURE:
        message += "; a lower one overflows the scores: for greedy decoding use 0 (or greedy)"
    return message


def _not_finite(value: float) -> str:
    """The message for a NaN or infinite float, or "" for a finite one."""
    return "" if math.isfinite(value) else f"{value} is not a finite number"
