"""Where the stages run: this process (``local``) or blocks over a Ray cluster (``ray``).

A runner changes where work happens, never what is written: every runner gives the same files.
Slurm job arrays need no runner of their own: each task is a local run of one shard
(:mod:`viscon_hub.runners.slurm`).

>>> RunnerOptions().kind
'local'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from viscon_hub.errors import ConfigError
from viscon_hub.recipe import opt

if TYPE_CHECKING:
    from viscon_hub.generate.stages import GenerateConfig, GenerateStats
    from viscon_hub.prepare.driver import PrepareConfig, PrepareStats

RUNNERS = ("local", "ray")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerOptions:
    """Which runner, and for Ray: the cluster, how many workers, block sizes and retries.

    ``ray_workers`` is the number of concurrent workers, each with its own engine running
    ``--max-concurrency`` requests; ``--rpm/--tpm`` are for the whole cluster and split evenly
    between workers. ``None`` means one worker per CPU of the cluster.
    """

    kind: Literal["local", "ray"] = opt(
        "local",
        "local: this process; ray: blocks over a Ray cluster through ray.data (pip install 'viscon-hub[ray]')",
        flag="--runner",
    )
    ray_address: str | None = opt(
        None, "Ray cluster to join (default: start a local one; 'auto': $RAY_ADDRESS)"
    )
    ray_workers: int | None = opt(
        None, "concurrent Ray workers, each with its own engine (default: the cluster's CPUs)"
    )
    prepare_block_size: int = opt(256, "documents per Ray block in prepare")
    generate_block_size: int = opt(16, "image contexts per Ray block in generate")
    max_retries: int = opt(3, "Ray retries of a failed block before it is a counted drop")

    def __post_init__(self) -> None:
        if self.kind not in RUNNERS:
            raise ConfigError(f"--runner must be one of {', '.join(RUNNERS)}; got {self.kind!r}")
        if self.kind != "ray" and (self.ray_address is not None or self.ray_workers is not None):
            raise ConfigError("--ray-address and --ray-workers need --runner ray")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConfigError(f"--ray-workers must be >= 1; got {self.ray_workers}")
        for name in ("prepare_block_size", "generate_block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0; got {self.max_retries}")


def run_prepare(
    config: PrepareConfig,
    *,
    runner: RunnerOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> PrepareStats:
    """``prepare(config)`` on the chosen runner."""
    runner = runner or RunnerOptions()
    if runner.kind == "ray":
        from viscon_hub.runners.ray import prepare_on_ray

        return prepare_on_ray(config, runner=runner, progress=progress)
    from viscon_hub.prepare.driver import prepare

    return prepare(config, progress=progress)


def run_generate(
    config: GenerateConfig, *, runner: RunnerOptions | None = None, progress: Callable[..., Any] | None = None
) -> GenerateStats:
    """``generate(config)`` on the chosen runner."""
    runner = runner or RunnerOptions()
    if runner.kind == "ray":
        from viscon_hub.runners.ray import generate_on_ray

        return generate_on_ray(config, runner=runner)
    from viscon_hub.generate.stages import generate

    return generate(config, progress=progress)


__all__ = ["RUNNERS", "RunnerOptions", "run_generate", "run_prepare"]
