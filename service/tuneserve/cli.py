"""The `tuneserve` command: `serve` runs the server; the other subcommands are a client.

tuneserve serve --base-model gpt2
tuneserve train --data rows.jsonl --adapter-id vader --wait
tuneserve generate "Question: who are you? Answer:" --adapter vader
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

STATE_NAMES = {v: k.removeprefix("JOB_STATE_") for k, v in pb.JobState.items()}
FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_") for k, v in pb.FinishReason.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ClientError as e:
        print(f"error: {e.code.name}: {e.message}", file=sys.stderr)
        for field, description in e.violations[1:]:
            print(f"       {field}: {description}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tuneserve jobs | head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


def _parser() -> argparse.ArgumentParser:
    from tuneserve import config

    parser = argparse.ArgumentParser(
        prog="tuneserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("TUNESERVE_TARGET", "localhost:50051"),
        help="server address for client commands (env TUNESERVE_TARGET)",
    )
    sub = parser.add_subparsers(required=True, metavar="command")
    client_options = _client_options()

    p = sub.add_parser("serve", help="run the server")
    config.add_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("build-tiny-model", help="build a tiny model offline, for tests and demos")
    p.add_argument("output_dir", type=Path)
    p.add_argument(  # tiny_models.ARCHITECTURES, without importing torch for --help
        "--architecture", choices=["gpt2", "llama", "mistral", "qwen2"], default="gpt2"
    )
    p.add_argument(
        "--text-file",
        type=Path,
        action="append",
        default=[],
        help="extra text to train the tokenizer on (repeatable)",
    )
    p.set_defaults(func=_build_tiny_model)

    p = sub.add_parser("train", help="submit a fine-tune", parents=[client_options])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="local JSONL file, sent with the request")
    source.add_argument("--server-path", help="JSONL file on the server, under its dataset roots")
    p.add_argument("--adapter-id", default="")
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--learning-rate", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--max-seq-length", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--lora-alpha", type=float, default=0.0)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--target-modules", default="", help="comma-separated module names")
    p.add_argument("--request-id", default="", help="idempotency key")
    p.add_argument(
        "--classify", action="store_true", help="sequence classification (rows of text and label)"
    )
    p.add_argument("--labels", default="", help="classification labels in order, comma-separated")
    p.add_argument("--parent", default="", help="continue training this adapter")
    p.add_argument(
        "--chat-template", type=Path, help="file with a Jinja chat template for rows of messages"
    )
    p.add_argument("--validation-data", type=Path, help="local JSONL of validation rows")
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="hold out this fraction of rows for evaluation",
    )
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps")
    p.add_argument("--scheduler", default="", choices=["", "linear", "cosine", "constant"])
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--gradient-accumulation-steps", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--packing", action="store_true", help="padding-free batches (same rows per step)"
    )
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--loss-on", default="", choices=["", "completion", "all"])
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("status", help="show a job", parents=[client_options])
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)

    p = sub.add_parser("curve", help="show a job's loss curve", parents=[client_options])
    p.add_argument("job_id")
    p.set_defaults(func=_curve)

    p = sub.add_parser(
        "classify", help="classify texts with a classification adapter", parents=[client_options]
    )
    p.add_argument("adapter_id")
    p.add_argument("texts", nargs="+")
    p.set_defaults(func=_classify)

    p = sub.add_parser("jobs", help="list jobs", parents=[client_options])
    p.add_argument("--state", choices=[s for s in STATE_NAMES.values() if s != "UNSPECIFIED"])
    p.set_defaults(func=_jobs)

    p = sub.add_parser("cancel", help="cancel a queued or running job", parents=[client_options])
    p.add_argument("job_id")
    p.set_defaults(func=_cancel)

    p = sub.add_parser(
        "generate", help="generate text, streamed to the terminal", parents=[client_options]
    )
    p.add_argument("prompt")
    p.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "adapters",
        help="list, show, delete, load, pin, unload or import adapters",
        parents=[client_options],
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "get", "delete", "load", "pin", "unload", "import"],
        default="list",
    )
    p.add_argument("adapter_id", nargs="?")
    p.add_argument("--path", help="import: the PEFT adapter directory on the server")
    p.set_defaults(func=_adapters)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from tuneserve.app import serve
    from tuneserve.config import load_config
    from tuneserve.errors import InvalidArgument
    from tuneserve.logs import setup_logging

    try:
        cfg = load_config(args)
    except InvalidArgument as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    setup_logging(level=cfg.log_level, json_format=cfg.log_format == "json")
    asyncio.run(serve(cfg))
    return 0


def _build_tiny_model(args: argparse.Namespace) -> int:
    from tuneserve.logs import quiet_libraries
    from tuneserve.tiny_models import build_tiny_model

    quiet_libraries()
    text = [line for f in args.text_file for line in f.read_text().splitlines()]
    build_tiny_model(args.output_dir, architecture=args.architecture, extra_text=text)
    print(f"tiny {args.architecture} model written to {args.output_dir}")
    return 0


def _client_options() -> argparse.ArgumentParser:
    """Options every client subcommand takes: how to reach a server that speaks TLS (mutual
    TLS with a client certificate) and asks for a bearer token. The token is read from a
    file or the environment, never from the command line, where `ps` would show it."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--tls-ca-file",
        type=Path,
        help="PEM CA certificate that signed the server's certificate; turns TLS on",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        help="use TLS with the system's trust store (implied by --tls-ca-file)",
    )
    group.add_argument(
        "--client-cert-file", type=Path, help="PEM client certificate chain, for mutual TLS"
    )
    group.add_argument("--client-key-file", type=Path, help="PEM private key of the client cert")
    group.add_argument(
        "--tls-server-name", help="name to check the server's certificate against (default: host)"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token (default: env TUNESERVE_TOKEN, if set)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="deadline in seconds of each quick call, retries included (default 30)",
    )
    return parent


def _client(args: argparse.Namespace) -> TuneserveClient:
    if (args.client_cert_file is None) != (args.client_key_file is None):
        raise SystemExit("error: --client-cert-file and --client-key-file go together")
    try:
        if args.token_file is not None:
            token: str | None = args.token_file.read_text().strip()
        else:
            token = os.environ.get("TUNESERVE_TOKEN") or None
        return TuneserveClient(
            args.target,
            timeout=args.timeout,
            tls=args.tls,
            root_certificates=args.tls_ca_file,
            certificate_chain=args.client_cert_file,
            private_key=args.client_key_file,
            server_name_override=args.tls_server_name,
            token=token,
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(args: argparse.Namespace) -> int:
    lora = pb.LoraConfig(
        r=args.lora_r,
        alpha=args.lora_alpha,
        target_modules=[m for m in args.target_modules.split(",") if m],
        use_rslora=args.rslora,
        use_dora=args.dora,
    )
    if args.lora_dropout is not None:
        lora.dropout = args.lora_dropout
    training = pb.TrainingConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_seq_length=args.max_seq_length,
        scheduler=args.scheduler,
        weight_decay=args.weight_decay,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        eval_fraction=args.eval_fraction,
        eval_every_steps=args.eval_every,
        checkpoint_every_steps=args.checkpoint_every,
        gradient_checkpointing=args.gradient_checkpointing,
        loss_on=args.loss_on,
        packing=args.packing,
    )
    if args.seed is not None:
        training.seed = args.seed
    if args.warmup_steps is not None:
        training.warmup_steps = args.warmup_steps
    with _client(args) as client:
        job = client.train(
            rows=_read_jsonl(args.data) if args.data is not None else None,
            dataset_path=args.server_path,
            validation_rows=_read_jsonl(args.validation_data) if args.validation_data else None,
            adapter_id=args.adapter_id,
            lora=lora,
            training=training,
            request_id=args.request_id,
            parent_adapter_id=args.parent,
            task=pb.TASK_TYPE_SEQUENCE_CLASSIFICATION if args.classify else pb.TASK_TYPE_CAUSAL_LM,
            labels=[label for label in args.labels.split(",") if label],
            chat_template=args.chat_template.read_text() if args.chat_template else "",
        )
        print(f"job {job.id} {STATE_NAMES[job.state]} -> adapter {job.adapter_id}")
        if not args.wait:
            return 0
        job = _follow(client, job.id)
    _print_job(job)
    return 0 if job.state == pb.JOB_STATE_SUCCEEDED else 1


def _follow(client: TuneserveClient, job_id: str) -> pb.Job:
    from tqdm import tqdm

    with tqdm(total=None, unit="step", dynamic_ncols=True, desc="queued") as bar:

        def show(job: pb.Job) -> None:
            p = job.progress
            if job.state == pb.JOB_STATE_QUEUED:
                bar.set_description(f"queued (position {p.queue_position})")
                return
            bar.set_description(STATE_NAMES[job.state].lower())
            if p.total_steps and bar.total != p.total_steps:
                bar.total = p.total_steps
            bar.n = p.step
            if p.step:
                bar.set_postfix(
                    loss=f"{p.loss:.4f}",
                    epoch=f"{p.epoch:.2f}",
                    tok_s=f"{p.tokens_per_second:.0f}",
                    refresh=False,
                )
            bar.refresh()

        return client.wait(job_id, poll_s=0.25, on_progress=show)


def _print_job(job: pb.Job) -> None:
    p = job.progress
    line = f"job {job.id} {STATE_NAMES[job.state]}  adapter={job.adapter_id}"
    if p.total_steps:
        line += f"  step {p.step}/{p.total_steps}  loss {p.loss:.4f}"
    if job.state == pb.JOB_STATE_QUEUED:
        line += f"  queue position {p.queue_position}"
    print(line)
    if p.eval_loss:
        line = f"  eval loss {p.eval_loss:.4f}"
        if job.task == pb.TASK_TYPE_SEQUENCE_CLASSIFICATION:
            line += f"  accuracy {p.eval_accuracy:.3f}  MCC {p.eval_matthews_correlation:.3f}"
        print(line)
    if p.resumed_from_step:
        print(f"  resumed from step {p.resumed_from_step}")
    for sample in job.samples:
        print(
            f"  sample: {sample.prompt!r} -> {sample.generated!r} (reference {sample.reference!r})"
        )
    if job.HasField("error") and job.error.code:
        print(f"  error {job.error.code}: {job.error.message}")


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_status(args.job_id)
    if args.json:
        print(json_format.MessageToJson(job))
    else:
        _print_job(job)
    return 0


def _curve(args: argparse.Namespace) -> int:
    with _client(args) as client:
        points = client.loss_curve(args.job_id)
    print("step  epoch    loss  eval_loss")
    for point in points:
        ev = f"{point.eval_loss:.4f}" if point.HasField("eval_loss") else ""
        print(f"{point.step:4d}  {point.epoch:5.2f}  {point.loss:.4f}  {ev}")
    return 0


def _classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        results = client.classify(args.adapter_id, args.texts)
    for text, result in zip(args.texts, results, strict=True):
        scores = "  ".join(f"{s.label}={s.score:.3f}" for s in result.scores)
        print(f"{result.label}\t{scores}\t{text}")
    return 0


def _jobs(args: argparse.Namespace) -> int:
    name = f"JOB_STATE_{args.state or 'UNSPECIFIED'}"
    with _client(args) as client:
        for job in client.list_jobs(state=pb.JobState.Value(name)):  # type: ignore[arg-type]
            _print_job(job)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_job(client.cancel(args.job_id))
    return 0


def _generate(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "greedy": args.greedy,
        "top_k": args.top_k,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "stop": args.stop,
    }
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    last = None
    with _client(args) as client:
        for chunk in client.generate_stream(args.prompt, adapter_id=args.adapter, **params):
            print(chunk.text, end="", flush=True)
            last = chunk
    print()
    if last is not None:
        print(
            f"[{FINISH_NAMES[last.finish_reason]}, {last.prompt_tokens} prompt + "
            f"{last.generated_tokens} generated tokens, seed {last.seed}]",
            file=sys.stderr,
        )
    return 0


def _adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            for a in client.list_adapters():
                state = " pinned" if a.pinned else " loaded" if a.loaded else ""
                print(
                    f"{a.id}{state}  base={a.base_model}  r={a.lora.r}  steps={a.steps}  "
                    f"loss={a.final_loss:.4f}  {a.size_bytes / 1024:.0f} KiB  job={a.source_job_id}"
                )
            return 0
        if not args.adapter_id:
            print("error: an adapter id is needed", file=sys.stderr)
            return 2
        if args.action == "get":
            print(json_format.MessageToJson(client.get_adapter(args.adapter_id)))
        elif args.action in ("load", "pin"):
            a = client.load_adapter(args.adapter_id, pin=args.action == "pin")
            print(f"adapter {a.id} loaded{' and pinned' if a.pinned else ''}")
        elif args.action == "unload":
            client.unload_adapter(args.adapter_id)
            print(f"adapter {args.adapter_id} unloaded")
        elif args.action == "import":
            a = client.import_adapter(args.path or "", args.adapter_id)
            print(
                f"adapter {a.id} imported: r={a.lora.r} targets={','.join(a.lora.target_modules)}"
            )
        else:
            client.delete_adapter(args.adapter_id)
            print(f"adapter {args.adapter_id} deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
