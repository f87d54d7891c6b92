"""Cost per million tokens at the measured throughput, from an hourly instance price.

The price table is ONE file, `prices.json` beside this module (region, currency, date looked
up, source, and per instance whether the number was confirmed); `--prices FILE` replaces it and
`--cost-per-hour` bypasses it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PRICES = Path(__file__).with_name("prices.json")
_STATUS_NOTE = {
    "confirmed": "confirmed on AWS's page",
    "secondary": "not confirmed on AWS's page",
    "unconfirmed": "UNCONFIRMED",
}


@dataclass(frozen=True)
class Price:
    """What one instance-hour costs. `source` says where the number came from, for the report."""

    cost_per_hour: float
    currency: str = "USD"
    instance_type: str | None = None
    source: str = "--cost-per-hour"


def load_prices(path: Path | None = None) -> dict[str, Any]:
    """The price table (default: prices.json beside this module); ValueError when unusable."""
    path = path or DEFAULT_PRICES
    try:
        table = json.loads(Path(path).read_text())
        instances = table["instances"]
        for name, row in instances.items():
            if not float(row["price_per_hour"]) > 0:
                raise ValueError(f"{name}: price_per_hour must be > 0")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"bad price table {path}: {e}") from None
    return table


def resolve_price(instance_type: str | None, cost_per_hour: float | None,
                  prices_path: Path | None = None) -> Price | None:
    """The hourly price to use: --cost-per-hour wins, else --instance-type's row of the table.

    None when neither is given (no cost columns). An unknown instance type is a ValueError whose
    one-line message lists the known ones.
    """
    if cost_per_hour is not None:
        if not (math.isfinite(cost_per_hour) and cost_per_hour > 0):
            raise ValueError(f"--cost-per-hour must be > 0, got {cost_per_hour}")
        return Price(cost_per_hour, "USD", instance_type, "--cost-per-hour")
    if instance_type is None:
        return None
    path = Path(prices_path or DEFAULT_PRICES)
    table = load_prices(path)
    row = table["instances"].get(instance_type)
    if row is None:
        known = ", ".join(sorted(table["instances"]))
        raise ValueError(f"unknown --instance-type {instance_type!r} (known in {path.name}: {known}); "
                         f"or give --cost-per-hour")
    status = row.get("status", "unconfirmed")
    parts = [path.name, table.get("region"), table.get("looked_up") and f"looked up {table['looked_up']}",
             _STATUS_NOTE.get(status, status)]
    source = ", ".join(str(p) for p in parts if p)
    return Price(float(row["price_per_hour"]), table.get("currency", "USD"), instance_type, source)


def cost_per_million_tokens(cost_per_hour: float, tokens_per_second: float) -> float | None:
    """What one million tokens cost at this throughput: cost_per_hour / (tokens_per_second * 3600) * 1e6.

    The instance is billed `cost_per_hour` whether busy or not, and turns out
    `tokens_per_second * 3600` tokens an hour at the measured pace; one million tokens therefore
    cost the hourly price times 1e6 over that. None when no tokens were measured.
    """
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return cost_per_hour / (tokens_per_second * 3600.0) * 1e6


def cost_fields(price: Price | None, result: dict[str, Any]) -> dict[str, Any]:
    """The cost keys of one sweep point's result (empty without a price).

    Output cost uses the output-token throughput (total_output_tokens / duration); input cost the
    input-token throughput measured over the same duration (total_input_tokens / duration). Each
    charges the whole instance-hour to one kind of token, as per-token price lists do, so the
    two are alternative views of the same bill and do not add up.
    """
    if price is None:
        return {}
    duration = result["duration"] or 0.0
    input_tps = result["total_input_tokens"] / duration if duration > 0 else 0.0
    return {
        "instance_type": price.instance_type,
        "cost_per_hour": price.cost_per_hour,
        "currency": price.currency,
        "price_source": price.source,
        "input_throughput": input_tps,
        "cost_per_million_output_tokens": cost_per_million_tokens(price.cost_per_hour, result["output_throughput"]),
        "cost_per_million_input_tokens": cost_per_million_tokens(price.cost_per_hour, input_tps),
    }


def currency_symbol(currency: str) -> str:
    return "$" if currency == "USD" else f"{currency} "
