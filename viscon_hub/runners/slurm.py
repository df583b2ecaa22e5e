"""Slurm job arrays without Ray: each array task runs one shard, and the shard comes from the task id.

``sbatch --array=0-7`` starts eight tasks that all run the same command; Slurm tells each its place
through ``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_STEP`` and
``SLURM_ARRAY_TASK_COUNT``. Explicit ``--num-shards/--shard-index`` flags win over them.

>>> resolve_shard(None, None, env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"})
(4, 3)
>>> resolve_shard(None, None, env={})
(1, 0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from viscon_hub.errors import ConfigError


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"${name} must be an integer; got {raw!r}. Unset it or pass --num-shards/--shard-index"
        ) from None


def resolve_shard(
    num_shards: int | None, shard_index: int | None, *, env: Mapping[str, str] | None = None
) -> tuple[int, int]:
    """``(num_shards, shard_index)`` from the flags, else from a Slurm job array, else ``(1, 0)``."""
    env = os.environ if env is None else env
    if num_shards is not None and shard_index is not None:
        return num_shards, shard_index
    task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task_id is None:
        if shard_index is not None:
            raise ConfigError(
                f"--shard-index {shard_index} needs --num-shards (how many shards in all); "
                "outside a Slurm job array both flags go together"
            )
        return (num_shards or 1), 0
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN", 0)
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    index = (task_id - first) // step if shard_index is None else shard_index
    total = num_shards if num_shards is not None else count
    if total is None:
        raise ConfigError(
            f"in a Slurm job array (SLURM_ARRAY_TASK_ID={task_id}) without SLURM_ARRAY_TASK_COUNT: "
            "pass --num-shards N"
        )
    if not 0 <= index < total:
        raise ConfigError(
            f"shard index {index} (from SLURM_ARRAY_TASK_ID={task_id}, MIN={first}, STEP={step}) is not in "
            f"[0, {total - 1}] for {total} shards; run the array as --array=0-{total - 1} or pass "
            "--num-shards/--shard-index"
        )
    return total, index


__all__ = ["resolve_shard"]
