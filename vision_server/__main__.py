"""`python -m vision_server --model DIR|preset --port P ...`: load the vision weights, warm up, serve gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import torch

from dvd.checkpoint import resolve_model
from dvd.config import parse
from dvd.core_budget import CoreBudget
from dvd.dtype import resolve_dtype
from dvd.health import VISION_SERVICE
from dvd.logs import setup_logging
from dvd.runtime import freeze_heap, report_ports, tune_allocator
from dvd.server import drain, start_server, wait_for_stop
from dvd.tracing import setup_tracing
from vision_server.batcher import Batcher, DeviceRunner
from vision_server.config import ModelConfig, ServerConfig
from vision_server.data_plane import DataListener
from vision_server.metrics import Metrics
from vision_server.model import build_model, compile_vit
from vision_server.preprocess import install_image_limits
from vision_server.service import VirSettings, VisionServicer, add_to_server
from vision_server.weights import load_vision_weights, wanted

log = logging.getLogger("vision_server")


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    cfg = parse(ServerConfig, argv, prog="python -m vision_server", description=__doc__)
    return dataclasses.replace(cfg, devices=resolve_devices(cfg.devices))


def resolve_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    if devices == ("cuda",):
        return tuple(f"cuda:{i}" for i in range(torch.cuda.device_count())) or ("cuda:0",)
    return devices


def load(cfg: ServerConfig) -> tuple[ModelConfig, list[DeviceRunner]]:
    """Read the vision weights once, place one model copy per device and warm each up."""
    # A repo id: vision shards only.
    ckpt = resolve_model(cfg.model, keep=lambda name: wanted(name, flash=True), revision=cfg.revision)
    model_cfg = ModelConfig.from_checkpoint(ckpt, name=cfg.model if "/" not in cfg.model else None)
    tensors = load_vision_weights(ckpt, model_cfg.flash)
    dtype = resolve_dtype(cfg.dtype, ckpt, cfg.devices[0])
    runners = []
    for device in cfg.devices:
        model = build_model(model_cfg, tensors, device, dtype)
        if cfg.compile:
            compile_vit(model)
        runner = DeviceRunner(model, device)
        t0 = time.monotonic()
        runner.warmup(with_vir=model_cfg.flash)
        log.info("warmed up", extra={"device": device, "compiled": cfg.compile,
                                     "seconds": round(time.monotonic() - t0, 2)})
        padded = cfg.batching == "padded"
        if cfg.batching == "auto":
            t0 = time.monotonic()
            padded = not runner.batch_invariant(cfg.resolved_max_batch())
            log.info("batch invariance checked", extra={"device": device, "variable_groups_exact": not padded,
                                                         "seconds": round(time.monotonic() - t0, 2)})
        if padded:
            runner.micro_batch = cfg.resolved_micro_batch()
        budget = CoreBudget.from_env() if device == "cpu" else None
        if budget is not None:
            share = len(budget.vision_share())
            if len(budget.cpus) > 1 and runner.thread_invariant(min(share, torch.get_num_threads())):
                runner.budget = budget
            log.info("core budget", extra={"shared_with_engine": runner.budget is not None, "cpus": len(budget.cpus),
                                           "vision_share_when_both_busy": share})
        runners.append(runner)
    log.info("model ready", extra={"model": model_cfg.name, "flash": model_cfg.flash, "devices": ",".join(cfg.devices),
                                   "dtype": str(dtype), "max_batch": cfg.resolved_max_batch(),
                                   "micro_batch": ",".join(str(r.micro_batch or "variable") for r in runners)})
    return model_cfg, runners


async def serve(cfg: ServerConfig) -> None:
    install_image_limits(cfg.max_image_pixels)
    tune_allocator()
    model_cfg, runners = await asyncio.to_thread(load, cfg)
    vir = VirSettings(
        relative=model_cfg.vir_relative_threshold if cfg.vir_relative_threshold is None
        else cfg.vir_relative_threshold,
        absolute=model_cfg.vir_absolute_threshold if cfg.vir_absolute_threshold is None
        else cfg.vir_absolute_threshold, floor=cfg.vir_pressure_floor)
    metrics = Metrics(cfg.model)
    batcher = Batcher(runners, cfg.resolved_max_batch(), cfg.max_wait_ms / 1000, on_batch=metrics.observe_batch,
                      granularity=max(r.micro_batch for r in runners))
    batcher.tile_seconds = await asyncio.to_thread(runners[0].measure_tile_seconds, min(4, batcher.max_batch))
    metrics.bind_queue(lambda: batcher.queued_tiles)
    batcher.start()
    listener = None
    if cfg.data_port >= 0:
        listener = DataListener(cfg.internal.ssl_context(server_side=True))
        await listener.start(cfg.host, cfg.data_port)
    servicer = VisionServicer(cfg, model_cfg, batcher, metrics, vir, listener)
    sweeper = asyncio.create_task(servicer.shm_maps.sweep_forever(), name="shm-sweep")
    max_msg = cfg.media.max_images_per_request * max(cfg.media.max_image_bytes, cfg.media.max_video_bytes) + 2**20
    server, health, bound = await start_server(
        cfg.internal, cfg.host, cfg.port, lambda s: add_to_server(servicer, s),
        VISION_SERVICE, servicer.load,
        options=[("grpc.max_receive_message_length", max_msg), ("grpc.max_send_message_length", -1)])
    if cfg.metrics_port:
        metrics.serve(cfg.metrics_port, cfg.host)
    freeze_heap()
    servicer.ready = True
    await health.set(True)
    report_ports(grpc=bound, data=listener.port if listener else 0)
    log.info("serving", extra={"address": f"{cfg.host}:{bound}", "metrics_port": cfg.metrics_port,
                               "data_port": listener.port if listener else None,
                               "vir_relative": vir.relative, "vir_absolute": vir.absolute})

    await wait_for_stop()
    # Graceful: refuse new calls, let in-flight ones finish (their tiles are still being batched), then stop.
    log.info("stopping", extra={"inflight": servicer.inflight, "queued_tiles": batcher.queued_tiles})
    await drain(server, health, servicer, cfg.deadlines.drain_s)
    await batcher.close()
    sweeper.cancel()
    servicer.close()
    if listener is not None:
        await listener.close()
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    setup_logging(cfg.logs.log_level, cfg.logs.log_format)
    setup_tracing("dvd-vision")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
