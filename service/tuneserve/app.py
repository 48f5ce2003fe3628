"""Wiring and running the server: build the core from the configuration, serve gRPC, load
the model, and shut down gracefully on SIGTERM or SIGINT.

Start-up order: the port is bound and health answers NOT_SERVING at once; the model loads
and warms up; then the job worker starts and health turns SERVING.
Shutdown order: health NOT_SERVING and no new jobs; in-flight calls get `grace_period_s`;
the running job is stopped and queued again for the next start; the process exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc

from tuneserve.api.server import Health, create_server
from tuneserve.api.servicer import TuneserveServicer
from tuneserve.config import ServerConfig
from tuneserve.coserving import DevicePolicy
from tuneserve.inference.engine import Engine
from tuneserve.jobs.manager import JobManager, Limits
from tuneserve.jobs.store import SQLiteJobStore
from tuneserve.registry import AdapterRegistry
from tuneserve.training.runner import LoraTrainer

log = logging.getLogger(__name__)


@dataclass
class Services:
    config: ServerConfig
    store: SQLiteJobStore
    registry: AdapterRegistry
    engine: Engine
    jobs: JobManager


def build_services(config: ServerConfig) -> Services:
    store = SQLiteJobStore(config.db_path)
    registry = AdapterRegistry(config.adapters_dir)
    engine = Engine(config=config, registry=registry)
    policy = DevicePolicy(generation_busy=lambda: engine.busy, max_yield_s=config.training_yield_s)
    jobs = JobManager(
        store=store,
        registry=registry,
        trainer=LoraTrainer(base_model=config.base_model, device=engine.device, dtype=engine.dtype),
        base_model=config.base_model,
        datasets_dir=config.datasets_dir,
        limits=Limits(
            dataset_roots=config.dataset_roots,
            max_dataset_rows=config.max_dataset_rows,
            max_dataset_bytes=config.max_dataset_bytes,
            max_job_attempts=config.max_job_attempts,
        ),
        # A retrained adapter under a reused id must not be served from a stale copy.
        on_adapter_registered=lambda info: engine.drop_adapter(info.id),
        checkpoints_dir=config.checkpoints_dir,
        base_chat_template=lambda: getattr(engine.tokenizer, "chat_template", None),
        before_training_step=policy.before_training_step,
    )
    return Services(config=config, store=store, registry=registry, engine=engine, jobs=jobs)


class RunningServer:
    """A started server; tests use it directly, `serve` runs one until a signal."""

    def __init__(self, services: Services, server: grpc.aio.Server, port: int, health: Health):
        self.services, self.server, self.port, self.health = services, server, port, health

    @classmethod
    async def start(cls, config: ServerConfig) -> RunningServer:
        services = build_services(config)
        servicer = TuneserveServicer(
            jobs=services.jobs, registry=services.registry, engine=services.engine
        )
        server, port, health = await create_server(
            servicer, address=config.listen, max_message_bytes=config.max_message_bytes
        )
        await server.start()
        log.info("listening on port %d; loading %s", port, config.base_model)
        return cls(services, server, port, health)

    async def load(self) -> None:
        """Load and warm the model, start the job worker, turn health SERVING."""
        await asyncio.to_thread(self.services.engine.load)
        self.services.jobs.start()
        await self.health.set(True)
        log.info("serving on port %d", self.port)

    async def stop(self) -> None:
        log.info("shutting down: draining for up to %.1fs", self.services.config.grace_period_s)
        await self.health.set(False)
        self.services.jobs.stop_accepting()
        await self.server.stop(self.services.config.grace_period_s)
        await asyncio.to_thread(self.services.jobs.stop)
        self.services.store.close()
        log.info("stopped")


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
