"""End to end: the seed articles' workflows as jobs, evaluation, continuing an adapter,
and resuming after the process is killed."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest

from tests.support import ServerProcess, make_config, vader_rows, wait_running
from tuneserve_client import ClientError, TuneserveClient
from tuneserve_client.v1 import tuneserve_pb2 as pb

pytestmark = pytest.mark.e2e


def test_article_1_text_rows_with_validation_split_and_loss_curve(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    """Article 1: "Question: ... Answer: ..." text rows, loss on every token."""
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    rows = [{"text": r["prompt"] + r["response"]} for r in vader_rows()]
    with TuneserveClient(server.target) as client:
        job = client.train(
            rows=rows,
            adapter_id="article-1",
            lora=pb.LoraConfig(r=16),
            training=pb.TrainingConfig(
                epochs=10,
                learning_rate=0.01,
                batch_size=4,
                eval_fraction=0.25,
                scheduler="cosine",
                weight_decay=0.01,
            ),
        )
        job = client.wait(job.id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert (job.dataset_rows, job.validation_rows) == (12, 4)
        assert job.progress.eval_loss > 0
        curve = client.loss_curve(job.id)
        assert [p.step for p in curve] == list(range(1, job.progress.total_steps + 1))
        evaluated = [p for p in curve if p.HasField("eval_loss")]
        assert [p.step for p in evaluated] == [3 * e for e in range(1, 11)]  # every epoch
        assert evaluated[-1].eval_loss < evaluated[0].eval_loss
        assert curve[-1].loss < curve[0].loss
        assert client.get_adapter("article-1").eval_loss == pytest.approx(job.progress.eval_loss)


def test_article_4_loss_on_all_vs_completion_then_15_more_epochs(
    tiny_llama: Path, tmp_path: Path, server_factory
) -> None:
    """Article 4: loss on all tokens vs the assistant part only, then "train 15 more epochs"
    from the adapter, checked on a held-out prompt."""
    server = server_factory(make_config(tiny_llama, tmp_path))
    rows = vader_rows()
    train, held_out = rows[:12], rows[12:]
    settings = {"epochs": 5, "learning_rate": 0.01, "batch_size": 4}
    with TuneserveClient(server.target) as client:
        jobs = {}
        for loss_on in ("all", "completion"):
            job = client.train(
                rows=train,
                validation_rows=held_out,
                adapter_id=f"sft-{loss_on}",
                training=pb.TrainingConfig(loss_on=loss_on, **settings),
            )
            jobs[loss_on] = client.wait(job.id, timeout=300)
            assert jobs[loss_on].state == pb.JOB_STATE_SUCCEEDED, jobs[loss_on].error
        # The same tokens go through the model; only the loss mask differs.
        assert (
            client.get_adapter("sft-all").trained_tokens
            == client.get_adapter("sft-completion").trained_tokens
        )
        assert jobs["completion"].training.loss_on == "completion"

        more = client.train(
            rows=train,
            validation_rows=held_out,
            adapter_id="sft-more",
            parent_adapter_id="sft-completion",
            training=pb.TrainingConfig(**{**settings, "epochs": 15}),
        )
        more = client.wait(more.id, timeout=300)
        assert more.state == pb.JOB_STATE_SUCCEEDED, more.error
        assert more.parent_adapter_id == "sft-completion"
        adapter = client.get_adapter("sft-more")
        assert adapter.parent_adapter_id == "sft-completion"
        assert adapter.lora.r == client.get_adapter("sft-completion").lora.r
        parent_curve = client.loss_curve(jobs["completion"].id)
        fresh, parent_last = parent_curve[0].loss, parent_curve[-1].loss
        first = client.loss_curve(more.id)[0].loss
        # It starts where the parent ended, not from scratch.
        assert abs(first - parent_last) < abs(first - fresh)
        assert len(more.samples) == 3
        sample = more.samples[0]
        assert (
            sample.prompt == held_out[0]["prompt"] and sample.reference == held_out[0]["response"]
        )
        assert sample.generated  # what the adapter says to a prompt it never saw

        with pytest.raises(ClientError) as e:
            client.train(rows=train, adapter_id="orphan", parent_adapter_id="no-such")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert e.value.field == "parent_adapter_id"


def test_rslora_dora_and_gradient_accumulation(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    with TuneserveClient(server.target) as client:
        # DoRA cannot be served batched: a text-generation job with it is refused up front
        # (it used to train, then fail every Generate), a classification job may use it.
        with pytest.raises(ClientError) as e:
            client.train(rows=vader_rows(), lora=pb.LoraConfig(use_dora=True))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {f for f, _ in e.value.violations} == {"lora.use_dora"}
        dora = client.wait(
            client.train(
                rows=_sentiment_rows(),
                adapter_id="dora-classifier",
                task=pb.TASK_TYPE_SEQUENCE_CLASSIFICATION,
                lora=pb.LoraConfig(r=4, use_dora=True),
                training=pb.TrainingConfig(max_steps=2),
            ).id,
            timeout=300,
        )
        assert dora.state == pb.JOB_STATE_SUCCEEDED, dora.error
        assert dora.lora.use_dora
        assert len(client.classify("dora-classifier", ["a fine film"])) == 1
        job = client.train(
            rows=vader_rows(),
            adapter_id="variants",
            lora=pb.LoraConfig(r=4, use_rslora=True, target_modules=["c_attn"]),
            training=pb.TrainingConfig(
                epochs=2,
                batch_size=3,
                gradient_accumulation_steps=2,
                gradient_checkpointing=True,
                packing=True,
            ),
        )
        job = client.wait(job.id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        # 16 rows / 3 per micro-batch = 6 micro-batches, 2 per step: 3 steps an epoch
        # (packed or not: packing lays out a micro-batch's rows, it does not add any).
        assert job.progress.total_steps == 6
        assert job.training.packing
        assert job.lora.use_rslora
        modules = client.get_adapter("variants").lora.target_modules
        assert modules and all(m.endswith("c_attn") for m in modules)
        default = client.wait(
            client.train(
                rows=vader_rows()[:4],
                adapter_id="arch-default",
                lora=pb.LoraConfig(target_modules=["default"]),
                training=pb.TrainingConfig(max_steps=1),
            ).id,
            timeout=120,
        )
        assert default.state == pb.JOB_STATE_SUCCEEDED, default.error
        assert list(client.get_adapter("arch-default").lora.target_modules) == ["c_attn"]
        with pytest.raises(ClientError) as e:
            client.train(
                rows=vader_rows(),
                training=pb.TrainingConfig(
                    scheduler="sawtooth",
                    loss_on="some",
                    gradient_accumulation_steps=5000,
                ),
            )
        fields = {f for f, _ in e.value.violations}
        assert fields == {
            "training.scheduler",
            "training.loss_on",
            "training.gradient_accumulation_steps",
        }


def test_killed_mid_training_resumes_from_checkpoint_and_finishes_the_plan(
    tiny_gpt2: Path, tmp_path: Path, processes: list[ServerProcess]
) -> None:
    server = ServerProcess(tiny_gpt2, tmp_path)
    processes.append(server)
    planned = 400
    job = server.client.train(
        rows=vader_rows(),
        adapter_id="resumed",
        training=pb.TrainingConfig(max_steps=planned, batch_size=2, checkpoint_every_steps=20),
    )
    # Checkpoints live in the artifact store (here the embedded one, a directory), one key
    # per claim and step: checkpoints/<job>/<fence>-<step>.
    checkpoints = tmp_path / "artifacts" / "checkpoints" / job.id
    while not any(checkpoints.glob("*-*")) or server.client.get_status(job.id).progress.step < 60:
        wait_running(server.client, job.id)
    server.stop(signal.SIGKILL)
    saved = max(int(p.name.split("-")[1]) for p in checkpoints.glob("*-*"))
    assert saved >= 20

    again = ServerProcess(tiny_gpt2, tmp_path)
    processes.append(again)
    done = again.client.wait(job.id, poll_s=0.1, timeout=300)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.resumed_from_step == saved
    assert done.progress.step == done.progress.total_steps == planned
    assert again.client.get_adapter("resumed").steps == planned
    curve = again.client.loss_curve(job.id)
    assert [p.step for p in curve] == list(range(1, planned + 1))
    assert not checkpoints.exists()  # cleaned up once the job finished
    assert again.stop(signal.SIGTERM) == 0


def _sentiment_rows() -> list[dict[str, str]]:
    subjects = ["the film", "this book", "our trip", "the meal", "that song", "the game"]
    good = ["was wonderful", "felt great", "was a joy", "made me happy"]
    bad = ["was awful", "felt terrible", "was a mess", "made me sad"]
    rows = []
    for i, subject in enumerate(subjects):
        for j in range(4):
            rows.append({"text": f"{subject} {good[(i + j) % 4]}", "label": "positive"})
            rows.append({"text": f"{subject} {bad[(i + j) % 4]}", "label": "negative"})
    return rows


def test_article_3_sequence_classification_with_accuracy_and_mcc(
    tiny_gpt2: Path, tmp_path: Path, server_factory
) -> None:
    """Article 3: GPT-2 as a sequence classifier, scored by Matthews correlation."""
    server = server_factory(make_config(tiny_gpt2, tmp_path))
    rows = _sentiment_rows()
    with TuneserveClient(server.target) as client:
        job = client.train(
            rows=rows,
            adapter_id="sentiment",
            task=pb.TASK_TYPE_SEQUENCE_CLASSIFICATION,
            lora=pb.LoraConfig(r=8),
            training=pb.TrainingConfig(
                epochs=15, learning_rate=0.01, batch_size=8, eval_fraction=0.25
            ),
        )
        job = client.wait(job.id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert list(job.labels) == ["negative", "positive"]  # sorted, the head's order
        # A random tiny model generalises little, but clearly better than chance (0.5, MCC 0).
        assert job.progress.eval_accuracy >= 0.66
        assert job.progress.eval_matthews_correlation >= 0.3
        adapter = client.get_adapter("sentiment")
        assert adapter.task == pb.TASK_TYPE_SEQUENCE_CLASSIFICATION
        assert list(adapter.labels) == ["negative", "positive"]

        results = client.classify("sentiment", [r["text"] for r in rows])
        right = sum(r.label == row["label"] for r, row in zip(results, rows, strict=True))
        assert right / len(rows) >= 0.9  # the 36 training rows and most held-out ones
        for r in results:
            assert {s.label for s in r.scores} == {"negative", "positive"}
            assert sum(s.score for s in r.scores) == pytest.approx(1.0, abs=1e-4)
            assert r.scores[0].label == r.label

        with pytest.raises(ClientError) as e:
            client.generate("the film", adapter_id="sentiment")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ClientError) as e:
            client.train(
                rows=rows,
                task=pb.TASK_TYPE_SEQUENCE_CLASSIFICATION,
                validation_rows=[{"text": "so so", "label": "neutral"}],
            )
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.row == 0 and "neutral" in e.value.message
        with pytest.raises(ClientError) as e:
            client.train(rows=rows)  # labelled rows, but a causal LM job
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.field == "task"


HUMAN_ASSISTANT = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}### Human: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}### Assistant: {{ m['content'] }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def test_article_4_chat_rows_with_a_template_train_on_assistant_turns(
    tiny_llama: Path, tmp_path: Path, server_factory
) -> None:
    """Article 4's "### Human: ... ### Assistant: ..." conversations, loss on the assistant."""
    server = server_factory(make_config(tiny_llama, tmp_path))
    chats = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": r["prompt"].removeprefix("Question: ").removesuffix(" Answer:"),
                },
                {"role": "assistant", "content": r["response"].strip()},
            ]
        }
        for r in vader_rows()[:6]
    ]
    chats[0]["messages"] += [  # multi-turn
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Then nothing."},
    ]
    with TuneserveClient(server.target) as client:
        with pytest.raises(ClientError) as e:  # the tiny tokenizer has no template of its own
            client.train(rows=chats, adapter_id="chat")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.field == "chat_template"
        with pytest.raises(ClientError) as e:
            client.train(rows=chats, chat_template="{% for m in messages %}")
        assert e.value.field == "chat_template"
        with pytest.raises(ClientError) as e:
            client.train(
                rows=[{"messages": [{"role": "user", "content": "hi"}]}],
                chat_template=HUMAN_ASSISTANT,
            )
        assert e.value.field == "dataset.inline.rows[0].messages"

        job = client.train(
            rows=chats,
            adapter_id="chat",
            chat_template=HUMAN_ASSISTANT,
            training=pb.TrainingConfig(epochs=40, learning_rate=0.01, batch_size=3),
        )
        job = client.wait(job.id, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        question = chats[1]["messages"][0]["content"]
        out = client.generate(
            f"### Human: {question}\n### Assistant:",
            adapter_id="chat",
            greedy=True,
            stop=["\n"],
        )
        assert out.text.strip() == chats[1]["messages"][1]["content"]
