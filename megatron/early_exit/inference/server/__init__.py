"""REST text generation: Megatron's PUT /api and OpenAI-compatible endpoints over continuous batching.

    python tools/run_text_generation_server.py --load CKPT --port 5000

Layout: schemas.py (request bodies), requests.py (bodies -> jobs), scheduler.py (the
continuous-batching worker over the engine's step API), batch_scheduler.py (batch at a time,
for the pipeline-parallel engine), distributed.py (rank 0 serves, the other ranks replay its
engine calls), responses.py (JSON shapes), metrics.py
(Prometheus text), app.py (the FastAPI routes).
"""

from megatron.early_exit.inference.server.app import create_app
from megatron.early_exit.inference.server.batch_scheduler import BatchScheduler
from megatron.early_exit.inference.server.distributed import EngineDriver, follow
from megatron.early_exit.inference.server.metrics import Metrics
from megatron.early_exit.inference.server.requests import Context, Limits
from megatron.early_exit.inference.server.scheduler import BaseScheduler, Job, QueueFull, Scheduler

__all__ = [
    "BaseScheduler",
    "BatchScheduler",
    "Context",
    "EngineDriver",
    "Job",
    "Limits",
    "Metrics",
    "QueueFull",
    "Scheduler",
    "create_app",
    "follow",
]
