"""Model prices for cost estimates, from ``configs/prices.yaml`` (USD per million tokens).

Batch API prices are separate; a model without them is priced at its standard rate in a batch.

>>> PriceTable({"m": (1.0, 2.0)}, batch={"m": (0.5, 1.0)}).cost("m", 1_000_000, 500_000)
2.0
>>> PriceTable({"m": (1.0, 2.0)}, batch={"m": (0.5, 1.0)}).cost("m", 1_000_000, 500_000, batch=True)
1.0
"""

from __future__ import annotations

import os
from pathlib import Path

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
