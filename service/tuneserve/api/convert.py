"""Protobuf <-> domain objects. The only module that knows both."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from tuneserve.errors import InvalidArgument
from tuneserve.inference.params import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
)
from tuneserve.jobs.manager import TrainRequest
from tuneserve.jobs.model import Job, JobState, LoraSpec, Task, TrainingSpec
from tuneserve.jobs.store import LossPoint
from tuneserve.registry import AdapterInfo
from tuneserve_client.v1 import tuneserve_pb2 as pb

_STATES = {
    JobState.QUEUED: pb.JOB_STATE_QUEUED,
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_TASKS = {
    Task.CAUSAL_LM: pb.TASK_TYPE_CAUSAL_LM,
    Task.CLASSIFICATION: pb.TASK_TYPE_SEQUENCE_CLASSIFICATION,
}
_TASKS_BACK = {v: k for k, v in _TASKS.items()}
_FINISH = {
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def _dataset(dataset: pb.Dataset) -> tuple[list[dict[str, Any]] | None, str | None]:
    source = dataset.WhichOneof("source")
    if source == "inline":
        rows = [
            {
                "text": r.text,
                "prompt": r.prompt,
                "response": r.response,
                "label": r.label,
                "messages": [{"role": m.role, "content": m.content} for m in r.messages],
            }
            for r in dataset.inline.rows
        ]
        return rows, None
    return None, dataset.path if source == "path" else None


def train_request(req: pb.TrainJobRequest, *, caller: str = "") -> TrainRequest:
    if req.dataset.WhichOneof("source") is None:
        raise InvalidArgument("dataset: give inline rows or a path", field="dataset")
    if req.task not in _TASKS_BACK and req.task != pb.TASK_TYPE_UNSPECIFIED:
        raise InvalidArgument(
            f"task: {req.task} is not a task type (causal LM or sequence classification)",
            field="task",
        )
    rows, path = _dataset(req.dataset)
    validation_rows, validation_path = _dataset(req.validation)
    defaults_lora, defaults_tr = LoraSpec(), TrainingSpec()
    lora, tr = req.lora, req.training
    return TrainRequest(
        rows=rows,
        dataset_path=path,
        validation_rows=validation_rows,
        validation_path=validation_path,
        parent_adapter_id=req.parent_adapter_id,
        task=_TASKS_BACK.get(req.task, Task.CAUSAL_LM),
        labels=tuple(req.labels),
        chat_template=req.chat_template,
        adapter_id=req.adapter_id,
        lora=LoraSpec(
            r=lora.r or defaults_lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout if lora.HasField("dropout") else defaults_lora.dropout,
            target_modules=tuple(lora.target_modules),
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
        ),
        training=TrainingSpec(
            epochs=tr.epochs or defaults_tr.epochs,
            max_steps=tr.max_steps,
            learning_rate=tr.learning_rate or defaults_tr.learning_rate,
            batch_size=tr.batch_size or defaults_tr.batch_size,
            max_seq_length=tr.max_seq_length or defaults_tr.max_seq_length,
            seed=tr.seed if tr.HasField("seed") else defaults_tr.seed,
            warmup_steps=tr.warmup_steps if tr.HasField("warmup_steps") else None,
            scheduler=tr.scheduler or defaults_tr.scheduler,
            weight_decay=tr.weight_decay,
            gradient_accumulation_steps=tr.gradient_accumulation_steps or 1,
            eval_fraction=tr.eval_fraction,
            eval_every_steps=tr.eval_every_steps,
            checkpoint_every_steps=tr.checkpoint_every_steps,
            gradient_checkpointing=tr.gradient_checkpointing,
            loss_on=tr.loss_on or defaults_tr.loss_on,
            packing=tr.packing,
        ),
        request_id=req.request_id,
        caller=caller,
        lora_given=frozenset(f.name for f, _ in lora.ListFields()),
        training_given=frozenset(f.name for f, _ in tr.ListFields()),
    )


def job(j: Job) -> pb.Job:
    s, p = j.spec, j.progress
    out = pb.Job(
        id=j.id,
        state=_STATES[j.state],
        progress=pb.JobProgress(
            step=p.step,
            total_steps=p.total_steps,
            epoch=p.epoch,
            total_epochs=p.total_epochs,
            loss=p.loss,
            tokens_per_second=p.tokens_per_second,
            eta_seconds=p.eta_seconds,
            queue_position=j.queue_position,
            fraction_done=p.fraction_done,
            eval_loss=p.eval_loss,
            resumed_from_step=p.resumed_from_step,
            eval_accuracy=p.eval_accuracy,
            eval_matthews_correlation=p.eval_matthews_correlation,
            mfu=p.mfu,
        ),
        create_time=_timestamp(j.created_at),
        adapter_id=s.adapter_id,
        base_model=s.base_model,
        dataset_rows=s.dataset_rows,
        validation_rows=s.validation_rows,
        parent_adapter_id=s.parent_adapter_id,
        samples=[pb.Sample(**sample) for sample in j.samples],
        task=_TASKS[s.task],
        labels=list(s.labels),
        request_id=s.request_id,
        lora=pb.LoraConfig(
            r=s.lora.r,
            alpha=s.lora.alpha,
            dropout=s.lora.dropout,
            target_modules=list(s.lora.target_modules),
            use_rslora=s.lora.use_rslora,
            use_dora=s.lora.use_dora,
        ),
        training=pb.TrainingConfig(
            epochs=s.training.epochs,
            max_steps=s.training.max_steps,
            learning_rate=s.training.learning_rate,
            batch_size=s.training.batch_size,
            max_seq_length=s.training.max_seq_length,
            seed=s.training.seed,
            warmup_steps=s.training.warmup_steps,
            scheduler=s.training.scheduler,
            weight_decay=s.training.weight_decay,
            gradient_accumulation_steps=s.training.gradient_accumulation_steps,
            eval_fraction=s.training.eval_fraction,
            eval_every_steps=s.training.eval_every_steps,
            checkpoint_every_steps=s.training.checkpoint_every_steps,
            gradient_checkpointing=s.training.gradient_checkpointing,
            loss_on=s.training.loss_on,
            packing=s.training.packing,
        ),
    )
    if j.started_at is not None:
        out.start_time.CopyFrom(_timestamp(j.started_at))
    if j.finished_at is not None:
        out.end_time.CopyFrom(_timestamp(j.finished_at))
    if j.error is not None:
        out.error.CopyFrom(
            pb.JobError(
                code=j.error.code,
                message=j.error.message,
                field=j.error.field,
                row=j.error.row if j.error.row is not None else -1,
            )
        )
    return out


def job_state(state: int) -> JobState | None:
    if state == pb.JOB_STATE_UNSPECIFIED:
        return None
    if state not in _STATES_BACK:
        raise InvalidArgument(f"state: {state} is not a job state", field="state")
    return _STATES_BACK[state]  # type: ignore[index]


def adapter(a: AdapterInfo, *, loaded: bool = False, pinned: bool = False) -> pb.Adapter:
    return pb.Adapter(
        id=a.id,
        base_model=a.base_model,
        lora=pb.LoraConfig(
            r=a.r, alpha=a.alpha, dropout=a.dropout, target_modules=list(a.target_modules)
        ),
        source_job_id=a.source_job_id,
        final_loss=a.final_loss,
        steps=a.steps,
        trained_tokens=a.trained_tokens,
        create_time=_timestamp(a.created_at),
        size_bytes=a.size_bytes,
        parent_adapter_id=a.parent_adapter_id,
        eval_loss=a.eval_loss or 0.0,
        task=_TASKS[Task(a.task)],
        labels=list(a.labels),
        loaded=loaded,
        pinned=pinned,
    )


def loss_curve(points: list[LossPoint]) -> pb.GetLossCurveResponse:
    return pb.GetLossCurveResponse(
        points=[
            pb.LossPoint(step=p.step, epoch=p.epoch, loss=p.loss, eval_loss=p.eval_loss)
            for p in points
        ]
    )


def generation_request(
    req: pb.GenerateRequest | pb.GenerateStreamRequest,
) -> GenerationRequest:
    p = req.parameters
    return GenerationRequest(
        prompt=req.prompt,
        adapter_id=req.adapter_id,
        params=SamplingParams(
            max_new_tokens=p.max_new_tokens,
            greedy=p.greedy,
            temperature=p.temperature if p.HasField("temperature") else 1.0,
            top_k=p.top_k,
            top_p=p.top_p if p.HasField("top_p") else 1.0,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
            no_repeat_ngram_size=p.no_repeat_ngram_size,
            seed=p.seed if p.HasField("seed") else None,
            stop=tuple(p.stop),
        ),
    )


def finish_reason(reason: FinishReason | None) -> int:
    return _FINISH[reason] if reason is not None else pb.FINISH_REASON_UNSPECIFIED


def stream_chunk(c: GenerationChunk) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        text=c.text,
        finish_reason=finish_reason(c.finish_reason),  # type: ignore[arg-type]
        prompt_tokens=c.prompt_tokens if c.finish_reason else 0,
        generated_tokens=c.generated_tokens,
        seed=c.seed,
    )


def _timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def classifications(results: list[list[tuple[str, float]]]) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        classifications=[
            pb.Classification(
                label=scores[0][0],
                scores=[pb.LabelScore(label=label, score=score) for label, score in scores],
            )
            for scores in results
        ]
    )
