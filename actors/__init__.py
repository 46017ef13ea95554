"""The actors: CryptoWorker (one host, one session each) and HealthActor (probes)."""

from p11guard.actors._direct import run_direct
from p11guard.actors._health import HealthActor, Tick
from p11guard.actors._messages import (
    FastLane,
    HostRegistry,
    Inject,
    Job,
    JobDone,
    ProbeResult,
    Renew,
    Report,
    RunJob,
    Shutdown,
    StartProbe,
    Ticket,
    WorkerFailed,
    WorkerReady,
    WorkerStopped,
    worker_key,
)
from p11guard.actors._pins import KeyPins
from p11guard.actors._worker import CryptoWorker

__all__ = [
    "CryptoWorker",
    "FastLane",
    "HealthActor",
    "HostRegistry",
    "Inject",
    "Job",
    "JobDone",
    "KeyPins",
    "ProbeResult",
    "Renew",
    "Report",
    "RunJob",
    "Shutdown",
    "StartProbe",
    "Tick",
    "Ticket",
    "WorkerFailed",
    "WorkerReady",
    "WorkerStopped",
    "run_direct",
    "worker_key",
]
