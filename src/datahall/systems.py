"""The registry of datahall's systems: what each is, its paper, its status, its CLI and its demo.

The CLI and the tour read only this registry. A system is ``ready`` when its Python API, CLI
sub-app, demo, tests, benchmark and docs page all exist and work (CONTRIBUTING.md); ``planned``
systems are listed by ``datahall systems`` and appear nowhere else. CLI apps and demos are named
by import path and loaded on use, so ``datahall --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import typer
    from rich.progress import Progress

    from .core.report import DemoResult

__all__ = ["System", "SYSTEMS", "get", "ready"]

Status = Literal["ready", "planned"]


@dataclass(frozen=True)
class System:
    """One datahall system. `cli` and `demo` are ``"module:attribute"`` import paths.

    A demo is ``demo(out_dir: Path, progress: rich.progress.Progress) -> DemoResult``: it runs on
    built-in data, writes its figures under `out_dir` and reports progress on `progress`.
    """

    name: str
    title: str
    package: str
    summary: str
    paper: str
    status: Status = "planned"
    cli: str | None = None
    demo: str | None = None

    @property
    def command(self) -> str:
        return f"datahall {self.name}" if self.status == "ready" and self.cli else ""

    def load_cli(self) -> typer.Typer:
        return _load(self.cli)

    def run_demo(self, out_dir: Path, progress: Progress) -> DemoResult:
        return _load(self.demo)(out_dir, progress)


def _load(path: str | None):
    if path is None:
        raise LookupError("this system has no such entry point")
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


SYSTEMS: tuple[System, ...] = (
    System(
        "collectives",
        "ForestColl",
        "datahall.collectives",
        "throughput-optimal collective schedules for any GPU fabric; MSCCL export; simulator",
        "ForestColl, NSDI '26",
        "ready",
        "datahall.collectives.cli:app",
        "datahall.collectives.demo:run",
    ),
    System(
        "kvshare",
        "DroidSpeak",
        "datahall.kvshare",
        "KV-cache reuse across fine-tuned variants of one base LLM; selective layer recompute",
        "DroidSpeak, NSDI '26",
        "ready",
        "datahall.kvshare.cli:app",
        "datahall.kvshare.demo:run",
    ),
    System(
        "gateway",
        "AI gateway",
        "datahall.gateway",
        "OpenAI-compatible AI-aware load balancer: ORCA, prefix-aware routing, semantic cache",
        "Azure AI networking keynote",
        "ready",
        "datahall.gateway.cli:app",
        "datahall.gateway.demo:run",
    ),
    System(
        "heuristics",
        "MetaEase",
        "datahall.heuristics",
        "finds worst-case inputs of heuristics straight from their source code",
        "MetaEase, NSDI '26 (MetaOpt, NSDI '24)",
        "ready",
        "datahall.heuristics.cli:app",
        "datahall.heuristics.demo:run",
    ),
    System(
        "ebpf",
        "KrakenGuard",
        "datahall.ebpf",
        "load-time policy checking of eBPF programs by symbolic execution",
        "KrakenGuard, NSDI '26",
        "ready",
        "datahall.ebpf.cli:app",
        "datahall.ebpf.demo:run",
    ),
    System(
        "optical",
        "HEDGE",
        "datahall.optical",
        "traffic engineering with probabilistic, wavelength-level link capacities",
        "HEDGE, NSDI '26",
    ),
    System(
        "dataplane",
        "SONiC DASH",
        "datahall.dataplane",
        "the DASH SmartSwitch SDN pipeline, packet-exact",
        "SONiC DASH SmartSwitch, NSDI '26",
    ),
    System(
        "memory",
        "Octopus",
        "datahall.memory",
        "switch-free CXL memory-pod designs, pooling simulation, shared-memory RPC",
        "Octopus, NSDI '26",
    ),
    System(
        "fabric",
        "Fabric health",
        "datahall.fabric",
        "probing, gray-failure localization and mitigation for AI fabrics",
        "Azure AI networking keynote",
    ),
    System(
        "harvest",
        "HarvestContainers",
        "datahall.harvest",
        "lends idle cores of latency-critical containers to batch work",
        "HarvestContainers, NSDI '26",
    ),
    System(
        "migration",
        "Pyrocumulus",
        "datahall.migration",
        "live migration of VMs with local-disk state",
        "Pyrocumulus, NSDI '26",
    ),
    System(
        "protocols",
        "Eywa",
        "datahall.protocols",
        "model-based testing of protocol implementations (DNS, BGP, SMTP)",
        "Eywa, NSDI '26",
    ),
    System(
        "video",
        "AVA",
        "datahall.video",
        "long-video question answering over an event knowledge graph",
        "AVA, NSDI '26",
    ),
)


def get(name: str) -> System:
    """The system called `name` (its CLI name, e.g. ``collectives``, or its title)."""
    for s in SYSTEMS:
        if name in (s.name, s.title) or name.lower() == s.title.lower():
            return s
    names = ", ".join(s.name for s in SYSTEMS)
    raise ValueError(f"unknown system {name!r}; choose one of {names}")


def ready() -> list[System]:
    """The systems whose status is ``ready``, in table order."""
    return [s for s in SYSTEMS if s.status == "ready"]
