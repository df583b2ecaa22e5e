"""Model prices for cost estimates, from ``configs/prices.yaml`` (USD per million tokens).

Batch API prices are separate; a model without them is priced at its standard rate in a batch.

>>> PriceTable({"m": (1.0, 2.0)}, batch={"m": (0.5, 1.0)}).cost("m", 1_000_000, 500_000)
2.0
>>> PriceTable({"m": (1.0, 2.0)}, batch={"m": (0.5, 1.0)}).cost("m", 1_000_000, 500_000, batch=True)
1.0
>>> usage = Usage(PriceTable({"m": (1.0, 2.0)}, batch={"m": (0.5, 1.0)}), batch_models=batch_models(["openai-batch:m"]))
>>> usage.add("m", 1_000_000, 500_000)
1.0
>>> usage.to_dict(), usage.cost_usd
({'m': {'replies': 1, 'prompt_tokens': 1000000, 'completion_tokens': 500000, 'cost_usd': 1.0}}, 1.0)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from viscon_hub.errors import ConfigError
from viscon_hub.resources import config_path


class PriceTable:
    """Prompt and completion prices per model; unknown models cost 0 and are reported as unpriced."""

    def __init__(
        self,
        prices: dict[str, tuple[float, float]] | None = None,
        *,
        batch: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.prices = dict(prices or {})
        self.batch = dict(batch or {})
        self.unpriced: set[str] = set()

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PriceTable:
        import yaml

        path = Path(path) if path is not None else config_path("prices.yaml")
        if path is None or not path.is_file():
            return cls()
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise ConfigError(f"{path}: `models` must map a model name to its prices")
        prices, batch = {}, {}
        for name, entry in models.items():
            try:
                prices[str(name)] = (
                    float(entry["prompt_per_million"]),
                    float(entry["completion_per_million"]),
                )
                if "batch_prompt_per_million" in entry or "batch_completion_per_million" in entry:
                    batch[str(name)] = (
                        float(entry["batch_prompt_per_million"]),
                        float(entry["batch_completion_per_million"]),
                    )
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    f"{path}: model {name!r} needs numeric prompt_per_million and completion_per_million "
                    f"(and both batch_ prices, or neither); got {entry!r}"
                ) from None
        return cls(prices, batch=batch)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, *, batch: bool = False) -> float:
        price = (self.batch.get(model) if batch else None) or self.prices.get(model)
        if price is None:
            self.unpriced.add(model)
            return 0.0
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000


def batch_models(specs: Iterable[str | None]) -> set[str]:
    """The models of ``BACKEND:MODEL`` specs that go through a provider's Batch API (its own prices)."""
    return {s.split(":", 1)[1] for s in specs if isinstance(s, str) and s.startswith("openai-batch:")}


class Usage:
    """Replies, tokens and cost per model: the one place a bill is added up (build, card, cache).

    Models in ``batch_models`` are priced at their Batch API rates.
    """

    def __init__(self, prices: PriceTable | None = None, *, batch_models: Iterable[str] = ()) -> None:
        self.prices = prices if prices is not None else PriceTable.load()
        self.batch_models = frozenset(batch_models)
        self.by_model: dict[str, dict[str, Any]] = {}

    def add(self, model: str, prompt_tokens: int, completion_tokens: int, *, replies: int = 1) -> float:
        """Count ``replies`` replies of ``model`` with these tokens; returns what they cost."""
        cost = self.prices.cost(model, prompt_tokens, completion_tokens, batch=model in self.batch_models)
        row = self.by_model.setdefault(
            model, {"replies": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        )
        row["replies"] += replies
        row["prompt_tokens"] += prompt_tokens
        row["completion_tokens"] += completion_tokens
        row["cost_usd"] += cost
        return cost

    @property
    def cost_usd(self) -> float:
        return sum(row["cost_usd"] for row in self.by_model.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Per model, sorted, with costs rounded to a millionth of a dollar."""
        return {m: {**row, "cost_usd": round(row["cost_usd"], 6)} for m, row in sorted(self.by_model.items())}
