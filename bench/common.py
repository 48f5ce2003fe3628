"""Pieces the benchmarks share: a deterministic synthetic prompt/response dataset with
long-tailed lengths, a small GPT-2-shaped model built offline, one loss on held-out rows
that every contender is scored with, and the plumbing of a results file.

Everything here is fixed by a seed and touches no network, so two runs of a benchmark on the
same machine train on the same bytes and differ only in timing noise."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast
from transformers import PreTrainedTokenizerBase as Tokenizer

from tuneserve.tiny_models import build_tokenizer

Row = dict[str, str]
T = TypeVar("T")

# --- Synthetic dataset --------------------------------------------------------------------
# A closed vocabulary: once the tokenizer has learnt every word as one token, a row's length
# in tokens is known while it is written, so lengths can follow a chosen distribution. The
# answer repeats the question's topic and "report" questions get long answers, so there is
# something for an adapter to learn (copying, when to stop) beyond word frequencies.

_TOPICS = (
    "the Death Star",
    "the Force",
    "a lightsaber",
    "the Rebel fleet",
    "hyperspace",
    "the Emperor",
    "a protocol droid",
    "the Senate",
    "Tatooine",
    "the ice planet Hoth",
    "a Star Destroyer",
    "the Jedi Council",
    "bounty hunters",
    "the dark side",
    "a TIE fighter",
    "the Millennium Falcon",
)
_SHORT_QUESTIONS = (
    "What do you think of {t}?",
    "How should I deal with {t}?",
    "Is {t} dangerous?",
    "What would you do about {t}?",
    "Why does {t} matter to the Empire?",
)
_LONG_QUESTIONS = (
    "Give me a full report on {t}.",
    "Explain everything you know about {t}, in detail.",
    "Write the briefing on {t} for the new recruits.",
)
_SENTENCES = (
    " {T} is {a} and {b}.",
    " The Empire will {v} {t} before {w}.",
    " You will {v} {t}, or you will fail me.",
    " I have seen {t} {v} many worlds.",
    " Do not underestimate {t}.",
    " {T} serves the dark side now.",
    " Your lack of faith in {t} is disturbing.",
    " Every officer must {v} {t} by {w}.",
    " The report on {t} is {a}.",
)
_ADJECTIVES = ("powerful", "dangerous", "useless", "ancient", "loyal", "broken", "silent", "vast")
_VERBS = ("destroy", "protect", "study", "capture", "command", "repair", "abandon", "find")
_WHEN = ("nightfall", "the battle", "the Emperor arrives", "the fleet returns", "tomorrow")


@dataclass(frozen=True)
class LengthMix:
    """Row lengths in tokens (prompt and response, before any end-of-sequence token): a share
    of long rows drawn from `long`, the rest from `short`. Real instruction data looks like
    this: most rows are a line or two, a few are documents."""

    short: tuple[int, int] = (20, 60)
    long: tuple[int, int] = (200, 500)
    long_fraction: float = 0.15


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _sentence(rng: random.Random, topic: str) -> str:
    return rng.choice(_SENTENCES).format(
        t=topic,
        T=_capitalise(topic),
        a=rng.choice(_ADJECTIVES),
        b=rng.choice(_ADJECTIVES),
        v=rng.choice(_VERBS),
        w=rng.choice(_WHEN),
    )


def tokenizer_corpus(seed: int, lines: int = 2000) -> list[str]:
    """Text that covers every word of the generator, for training the tokenizer on."""
    rng = random.Random(seed)
    corpus = [
        "Question: " + q.format(t=t) + " Answer:"
        for t in _TOPICS
        for q in (*_SHORT_QUESTIONS, *_LONG_QUESTIONS)
    ]
    corpus += ["".join(_sentence(rng, rng.choice(_TOPICS)) for _ in range(4)) for _ in range(lines)]
    return corpus


def _n_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _row(rng: random.Random, tokenizer: Tokenizer, *, long: bool, target: int) -> Row:
    topic = rng.choice(_TOPICS)
    question = rng.choice(_LONG_QUESTIONS if long else _SHORT_QUESTIONS)
    prompt = "Question: " + question.format(t=topic) + " Answer:"
    used = _n_tokens(tokenizer, prompt)
    parts: list[str] = []
    # Sentences start with a space, so token counts add up across them exactly.
    while True:
        sentence = _sentence(rng, topic)
        cost = _n_tokens(tokenizer, sentence)
        if parts and used + cost > target:
            break
        parts.append(sentence)
        used += cost
    return {"prompt": prompt, "response": "".join(parts)}


def make_rows(n: int, tokenizer: Tokenizer, *, mix: LengthMix, seed: int) -> list[Row]:
    """`n` prompt/response rows; exactly round(n * long_fraction) of them long, in random
    places, so a small run has the same tail as a big one."""
    rng = random.Random(seed)
    n_long = round(n * mix.long_fraction)
    kinds = [True] * n_long + [False] * (n - n_long)
    rng.shuffle(kinds)
    rows = []
    for long in kinds:
        low, high = mix.long if long else mix.short
        rows.append(_row(rng, tokenizer, long=long, target=rng.randint(low, high)))
    return rows


def pareto_lengths(
    n: int, *, median: float = 100.0, p99: float = 1000.0, low: int = 8, seed: int = 0
) -> list[int]:
    """`n` row lengths in tokens from a Pareto distribution fitted to a median and a 99th
    percentile, the long tail of real instruction data (a few rows are documents). Rows are
    not truncated here: a trainer's max_seq_length cuts them, as it cuts users' rows."""
    # Pareto quantile: x_m * (1 - q) ** (-1 / a); the median and p99 give a and x_m.
    shape = math.log(50) / math.log(p99 / median)
    scale = median / 2 ** (1 / shape)
    rng = random.Random(seed)
    return [max(low, round(scale * (1 - rng.random()) ** (-1 / shape))) for _ in range(n)]


def make_rows_of_lengths(lengths: Sequence[int], tokenizer: Tokenizer, *, seed: int) -> list[Row]:
    """One prompt/response row per length (a row's tokens, prompt and response, to within a
    sentence); rows over 200 tokens ask for a report."""
    rng = random.Random(seed)
    return [_row(rng, tokenizer, long=n > 200, target=n) for n in lengths]


def row_text(row: Row) -> str:
    """The text form of a prompt/response row, as the article-1 recipe trains on it."""
    return row["prompt"] + row["response"]


# --- Model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 1024
    vocab_size: int = 2048  # an upper bound: the tokenizer stops when every word is a token

    def as_dict(self) -> dict[str, int]:
        return {
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_positions": self.n_positions,
        }


def build_model_dir(
    output_dir: Path, shape: ModelShape, *, seed: int
) -> tuple[Path, PreTrainedTokenizerFast, int]:
    """Write a GPT-2-shaped model with random weights and its tokenizer to `output_dir`, so
    every contender loads the very same files. Returns the directory, the tokenizer and the
    model's parameter count."""
    tokenizer = build_tokenizer(tokenizer_corpus(seed), vocab_size=shape.vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        n_positions=shape.n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir, tokenizer, n_params


# --- Scoring ------------------------------------------------------------------------------

IGNORE_INDEX = -100


def _eval_example(
    tokenizer: Tokenizer, row: Row, max_len: int | None
) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token_id
    assert eos is not None
    prompt = list(tokenizer(row["prompt"])["input_ids"])
    response = [*tokenizer(row["response"], add_special_tokens=False)["input_ids"], eos]
    return (prompt + response)[:max_len], ([IGNORE_INDEX] * len(prompt) + response)[:max_len]


@torch.no_grad()
def response_loss(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    rows: Sequence[Row],
    *,
    batch_size: int = 8,
    max_len: int | None = None,
) -> float:
    """Mean cross-entropy per response token (end-of-sequence included) on held-out rows,
    prompts masked, pads neither attended to nor counted. Each contender's own training loss
    counts different tokens (the recipe's counts prompts and pads), so it cannot be compared;
    this one is the same yardstick for all, written here rather than taken from the service
    so that a change to the trainer cannot move it. Rows are cut at `max_len` tokens, as the
    trainers cut them."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    examples = [_eval_example(tokenizer, row, max_len) for row in rows]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        shifted = labels[:, 1:].to(device)
        total += float(
            F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)),
                shifted.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((shifted != IGNORE_INDEX).sum())
    return total / count


# --- Timing, environment, results -----------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """Run `fn` and return its result and its wall time in seconds, device work included."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def rotations(items: Sequence[T], repeats: int) -> Iterator[list[T]]:
    """The contenders' order for each repeat, rotated so that no contender always runs first
    (cold caches) or last (a machine warmed, or throttled, by the others)."""
    for r in range(repeats):
        k = r % len(items)
        yield [*items[k:], *items[:k]]


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: they mean little without it."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "type": device.type,
        "name": name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            p: _version(p) for p in ("torch", "transformers", "peft", "datasets", "accelerate")
        },
    }


def source_revision(module_file: str) -> dict[str, Any] | None:
    """The commit of the checkout a module was imported from, and whether its tree has
    uncommitted changes: results are only comparable for the code they measured. None when
    the module does not come from a git checkout."""
    where = Path(module_file).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", ".")  # this package's tree only
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(changed)}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: an interrupted run leaves the last good results in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --- Figures and goals ----------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between the closest ranks, as
    numpy's default does; None for no values. With fewer than 100 values p99 is close to the
    largest one, and is reported as such rather than hidden."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero: a missing figure stays missing."""
    return a / b if a is not None and b else None


def goal(value: float | None, target: float, op: str) -> dict[str, Any]:
    """A goal as the results file records it; a missing value is not met."""
    met = value is not None and (value >= target if op == ">=" else value <= target)
    return {"value": value, "target": target, "op": op, "met": met}


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted for a table, '-' when missing."""
    return "-" if value is None else format(value, spec)


# --- Contention -----------------------------------------------------------------------------


def process_ticks(pid: int | str = "self") -> int | None:
    """CPU time (user + system, in clock ticks) that process `pid` has used so far; None
    where /proc is not Linux's or the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class CpuUsage:
    """Cores kept busy on average over a window: by this process, by the processes it
    watches (a service under test in its own process), and by everything else."""

    process: float
    watched: float
    other: float


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time used so far: by the whole machine (steal included), by this process and by
    the watched processes, in clock ticks, with the wall time they were read at."""

    machine: int
    process: int
    wall: float
    watched: tuple[tuple[int, int], ...] = ()  # (pid, ticks) of each watched process

    def usage(self) -> CpuUsage | None:
        """Cores used since this snapshot. "other" is what processes that are neither this
        one nor a watched one (and the hypervisor) kept busy: on a shared machine, timings
        taken while it is well above zero are slowed by work that is not the benchmark's."""
        now = cpu_snapshot([pid for pid, _ in self.watched])
        if now is None or now.wall <= self.wall:
            return None
        seconds = (now.wall - self.wall) * os.sysconf("SC_CLK_TCK")
        then = dict(self.watched)
        watched = sum(ticks - then[pid] for pid, ticks in now.watched if pid in then)
        process = now.process - self.process
        other = (now.machine - self.machine) - process - watched
        return CpuUsage(
            process=process / seconds, watched=watched / seconds, other=max(0.0, other / seconds)
        )

    def other_cores(self) -> float | None:
        """Cores that other processes (and the hypervisor) kept busy on average since this
        snapshot; see `usage`."""
        usage = self.usage()
        return None if usage is None else usage.other


def cpu_snapshot(watch: Sequence[int] = ()) -> CpuSnapshot | None:
    """None where /proc is not Linux's. `watch`: pids whose CPU time is read too, and not
    counted as other processes' (one that has ended is left out)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        # user nice system idle iowait irq softirq steal (guest time is in user already)
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    except (OSError, ValueError, IndexError):
        return None
    mine = process_ticks()
    if mine is None:
        return None
    watched = tuple((pid, t) for pid in watch if (t := process_ticks(pid)) is not None)
    machine = user + nice + system + irq + softirq + steal
    return CpuSnapshot(machine=machine, process=mine, wall=time.perf_counter(), watched=watched)
