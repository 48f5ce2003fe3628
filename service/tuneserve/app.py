"""Wiring and running the server: build the core from the configuration, serve gRPC, load
the model, and shut down gracefully on SIGTERM or SIGINT.

Start-up order: the port is bound and health answers NOT_SERVING at once; the model loads
and warms up; then the job worker starts and health turns SERVING.
Shutdown order: health NOT_SERVING and no new jobs; in-flight calls get `grace_period_s`;
the running job is stopped and queued again for the next start; the process exits 0."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from tuneserve import failpoints
from tuneserve.api.interceptors import MetricsInterceptor
from tuneserve.api.security import BearerTokenInterceptor, TokenFile, server_credentials
from tuneserve.api.server import SERVICE_NAME, Health, create_health_server, create_server
from tuneserve.api.servicer import TuneserveServicer
from tuneserve.config import ServerConfig
from tuneserve.coserving import DevicePolicy
from tuneserve.data.chat_template import TemplateRenderer, special_tokens_of
from tuneserve.inference.engine import Engine
from tuneserve.inference.text_limits import MAX_CHARS_PER_TOKEN
from tuneserve.jobs.manager import JobManager, Limits, import_legacy_snapshots
from tuneserve.jobs.store import JobStore, open_job_store
from tuneserve.jobs.worker import Worker
from tuneserve.metrics import GpuCollector, Metrics
from tuneserve.registry import AdapterRegistry, import_legacy_adapters
from tuneserve.storage.artifacts import open_artifact_store
from tuneserve.storage.cache import ArtifactCache
from tuneserve.training.runner import LoraTrainer

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32


@dataclass
class Services:
    config: ServerConfig
    metrics: Metrics
    store: JobStore
    registry: AdapterRegistry
    engine: Engine
    jobs: JobManager
    renderer: TemplateRenderer


def build_services(config: ServerConfig) -> Services:
    store = open_job_store(config.job_store, default_path=config.db_path)
    log.info("job store: %s; role: %s; replica: %s", store.url, config.role, config.worker_id)
    artifacts = open_artifact_store(config.artifact_store, default_root=config.artifacts_dir)
    artifacts.check()
    log.info("artifact store: %s", artifacts.url)
    metrics = Metrics()
    registry = AdapterRegistry(
        index=store,
        artifacts=artifacts,
        cache=ArtifactCache(
            artifacts, config.data_dir / "adapter-cache", max_bytes=config.adapter_cache_bytes
        ),
        staging_root=config.data_dir / "staging",
    )
    if moved := import_legacy_adapters(config.legacy_adapters_dir, registry):
        log.info("moved %d adapter(s) of an earlier release into the registry", moved)
    if moved := import_legacy_snapshots(config.data_dir / "datasets", store, artifacts):
        log.info("moved the dataset snapshots of %d queued job(s) of an earlier release", moved)
    engine = Engine(config=config, registry=registry, observer=metrics)
    # Users' chat templates render in worker processes (data/chat_template.py); the first
    # one imports transformers while the model loads.
    renderer = TemplateRenderer(config.render_limits())
    renderer.start()
    worker = None
    if config.trains:
        policy = DevicePolicy(
            generation_busy=lambda: engine.busy,
            max_yield_s=config.training_yield_s,
            release_idle=engine.release_idle_threads,
        )
        worker = Worker(
            store=store,
            registry=registry,
            artifacts=artifacts,
            trainer=LoraTrainer(
                base_model=config.base_model,
                device=engine.device,
                dtype=engine.dtype,
                chat_renderer=renderer,
            ),
            work_dir=config.data_dir / "work",
            worker_id=config.worker_id,
            lease_s=config.lease_s,
            max_job_attempts=config.max_job_attempts,
            observer=metrics,
            before_training_step=policy.before_training_step,
            # A retrained adapter under a reused id must not be served from a stale copy.
            on_adapter_registered=lambda info: engine.drop_adapter(info.id),
        )
    jobs = JobManager(
        store=store,
        registry=registry,
        artifacts=artifacts,
        worker=worker,
        base_model=config.base_model,
        limits=Limits(
            dataset_roots=config.dataset_roots,
            max_dataset_rows=config.max_dataset_rows,
            max_dataset_bytes=config.max_dataset_bytes,
            max_job_attempts=config.max_job_attempts,
            max_queued_jobs=config.max_queued_jobs,
            max_queued_jobs_per_caller=config.max_queued_jobs_per_caller,
        ),
        base_chat_template=lambda: getattr(engine.tokenizer, "chat_template", None),
        layer_names=engine.layer_names,
        chat_renderer=renderer,
        base_special_tokens=lambda: special_tokens_of(engine.tokenizer) if engine.tokenizer else {},
    )
    watch_service(metrics, engine, jobs, GpuCollector(torch_memory=_torch_memory))
    return Services(
        config=config,
        metrics=metrics,
        store=store,
        registry=registry,
        engine=engine,
        jobs=jobs,
        renderer=renderer,
    )


def watch_service(metrics: Metrics, engine: Any, jobs: Any, gpu: Any) -> None:
    """Series read at scrape time from the core's own state: the jobs by state, the decode
    batch and queue, the adapter cache, and the GPUs (`gpu`, a GpuCollector)."""
    metrics.watch_jobs(jobs.counts)
    stats = lambda: engine.stats  # noqa: E731
    metrics.watch(
        "tuneserve_generation_batch_size", "Requests in the running batch.", lambda: stats().running
    )
    metrics.watch(
        "tuneserve_generation_queue_depth",
        "Requests waiting for a batch slot.",
        lambda: stats().waiting,
    )

    def adapters() -> Any:
        return engine.adapter_state() if engine.ready else None

    metrics.watch(
        "tuneserve_adapters_loaded",
        "Adapters loaded for generation.",
        lambda: len(a.loaded) if (a := adapters()) else 0,
    )
    metrics.watch_counter(
        "tuneserve_adapter_loads",
        "Adapter loads since start.",
        lambda: a.loads if (a := adapters()) else 0,
    )
    metrics.watch_counter(
        "tuneserve_adapter_evictions",
        "Adapter evictions since start.",
        lambda: a.evictions if (a := adapters()) else 0,
    )
    metrics.add_collector(gpu)


def generation_request_limits(config: ServerConfig) -> dict[str, int]:
    """The largest Generate/GenerateStream request worth parsing: a prompt of as many
    characters as `max_prompt_tokens` can hold (inference/text_limits.py), 4 UTF-8 bytes
    each, and room for the parameters and stop sequences."""
    limit = config.max_prompt_tokens * MAX_CHARS_PER_TOKEN * 4 + 64 * 1024
    return {f"/{SERVICE_NAME}/{method}": limit for method in ("Generate", "GenerateStream")}


def _torch_memory() -> list[tuple[str, int, int]]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        (f"cuda:{i}", torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i))
        for i in range(torch.cuda.device_count())
    ]


class RunningServer:
    """A started server; tests use it directly, `serve` runs one until a signal."""

    def __init__(
        self,
        services: Services,
        server: grpc.aio.Server,
        port: int,
        health: Health,
        metrics_server: Any,
        metrics_port: int,
        health_server: grpc.aio.Server | None = None,
        health_port: int | None = None,
        auth: BearerTokenInterceptor | None = None,
    ):
        self.services, self.server, self.port, self.health = services, server, port, health
        self._metrics_server, self.metrics_port = metrics_server, metrics_port
        # The plaintext health-only port (health_listen), if any.
        self.health_server, self.health_port = health_server, health_port
        self.auth = auth

    @classmethod
    async def start(cls, config: ServerConfig) -> RunningServer:
        failpoints.arm(config.failpoints)
        # asyncio.to_thread's pool: the default (cores + 4 threads) is so small that a few
        # slow calls would keep quick ones such as GetStatus waiting for a thread.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(DEFAULT_THREADS, "rpc"))
        services = build_services(config)
        servicer = TuneserveServicer(
            jobs=services.jobs, registry=services.registry, engine=services.engine
        )
        auth = None
        if config.auth_tokens_file:
            auth = BearerTokenInterceptor(TokenFile(config.auth_tokens_file))
        credentials = server_credentials(config)
        if auth is not None and credentials is None:
            log.warning(
                "bearer tokens are required but the port is plaintext: tokens travel in clear"
            )
        server, port, health = await create_server(
            servicer,
            address=config.listen,
            max_message_bytes=config.max_message_bytes,
            interceptors=[
                MetricsInterceptor(
                    services.metrics, max_request_bytes=generation_request_limits(config)
                )
            ],
            credentials=credentials,
            auth=auth,
        )
        health_server, health_port = None, None
        if config.health_listen:
            health_server, health_port = await create_health_server(
                health, address=config.health_listen
            )
        await server.start()
        if health_server is not None:
            await health_server.start()
        metrics_server, metrics_port = services.metrics.serve(config.metrics_listen)
        log.info(
            "listening on port %d (%s%s; metrics on %d%s); loading %s",
            port,
            _transport(config),
            ", bearer tokens" if auth is not None else "",
            metrics_port,
            f", plaintext health on {health_port}" if health_port is not None else "",
            config.base_model,
        )
        return cls(
            services,
            server,
            port,
            health,
            metrics_server,
            metrics_port,
            health_server=health_server,
            health_port=health_port,
            auth=auth,
        )

    async def load(self) -> None:
        """Load and warm the model, start the job worker, turn health SERVING."""
        await asyncio.to_thread(self.services.engine.load)
        # Everything alive now (the model, the libraries) lives as long as the process:
        # kept out of the collector's full passes, which otherwise walk it all with the
        # interpreter lock held (0.4 s on a small model after each job: health stalled).
        gc.collect()
        gc.freeze()
        self.services.jobs.start()
        await self.health.set(True)
        log.info("serving on port %d", self.port)

    async def stop(self) -> None:
        log.info("shutting down: draining for up to %.1fs", self.services.config.grace_period_s)
        await self.health.set(False)
        self.services.jobs.stop_accepting()
        await self.server.stop(self.services.config.grace_period_s)
        if self.health_server is not None:  # answered NOT_SERVING while the main port drained
            await self.health_server.stop(0)
        await asyncio.to_thread(self.services.jobs.stop)
        # After the jobs: one still rendering its rows stops there and is queued again.
        await asyncio.to_thread(self.services.renderer.close)
        await asyncio.to_thread(self.services.engine.stop)
        http, thread = self._metrics_server
        http.shutdown()
        http.server_close()
        thread.join(5)
        self.services.store.close()
        log.info("stopped")


def _transport(config: ServerConfig) -> str:
    if not config.tls_cert_file:
        return "plaintext"
    return "mutual TLS" if config.tls_client_ca_file else "TLS"


async def serve(config: ServerConfig) -> None:
    running = await RunningServer.start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loader = asyncio.create_task(running.load())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done:
        loader.result()  # a model that fails to load ends the process with its error
        await stopper
    else:
        loader.cancel()
    await running.stop()
