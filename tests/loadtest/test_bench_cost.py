"""Cost per million tokens: the arithmetic, the price table, the overrides and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.bench.__main__ import main
from loadtest.bench.cost import DEFAULT_PRICES, cost_fields, cost_per_million_tokens, load_prices, resolve_price
from loadtest.bench.report import format_result, markdown_table

REQUIRED = ("inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge", "trn1.2xlarge", "trn1.32xlarge",
            "c7i.xlarge", "c7i.2xlarge")


def test_the_arithmetic() -> None:
    # $3.60 an hour at 1000 tok/s = 3.6 M tokens an hour -> $1 per million
    assert cost_per_million_tokens(3.6, 1000.0) == pytest.approx(1.0)
    assert cost_per_million_tokens(0.7582, 50.0) == pytest.approx(0.7582 / (50 * 3600) * 1e6)
    assert cost_per_million_tokens(1.0, 0.0) is None
    result = {"duration": 10.0, "total_input_tokens": 20_000, "output_throughput": 500.0}
    fields = cost_fields(resolve_price("trn1.2xlarge", None), result)
    assert fields["cost_per_hour"] == 1.34375 and fields["currency"] == "USD"
    assert fields["input_throughput"] == 2000.0  # input tokens over the same duration
    assert fields["cost_per_million_output_tokens"] == pytest.approx(1.34375 / (500 * 3600) * 1e6)
    assert fields["cost_per_million_input_tokens"] == pytest.approx(1.34375 / (2000 * 3600) * 1e6)
    assert cost_fields(None, result) == {}


def test_the_price_table_says_where_its_numbers_come_from() -> None:
    table = load_prices()
    assert (table["region"], table["currency"]) == ("us-east-1", "USD")
    assert table["looked_up"] and "aws.amazon.com/ec2/pricing/on-demand" in table["source"]
    assert set(REQUIRED) <= set(table["instances"])
    for name, row in table["instances"].items():
        assert row["price_per_hour"] > 0, name
        assert row["status"] in table["status_meaning"], name
        assert row["evidence"], name


def test_overrides(tmp_path: Path) -> None:
    assert resolve_price(None, None) is None
    price = resolve_price("inf2.xlarge", None)
    assert price is not None and price.cost_per_hour == 0.7582 and "prices.json" in price.source
    override = resolve_price("inf2.xlarge", 0.5)  # --cost-per-hour wins, the name stays
    assert override is not None and (override.cost_per_hour, override.instance_type) == (0.5, "inf2.xlarge")
    assert override.source == "--cost-per-hour"
    custom = tmp_path / "prices.json"
    custom.write_text(json.dumps({"currency": "EUR", "instances": {"box.large": {"price_per_hour": 2.0}}}))
    price = resolve_price("box.large", None, custom)
    assert price is not None and (price.cost_per_hour, price.currency) == (2.0, "EUR")
    with pytest.raises(ValueError, match="unknown --instance-type 'inf2.xlarge'.*box.large"):
        resolve_price("inf2.xlarge", None, custom)  # --prices replaces the whole table
    with pytest.raises(ValueError, match="--cost-per-hour must be > 0"):
        resolve_price(None, 0.0)
    custom.write_text("{}")
    with pytest.raises(ValueError, match="bad price table"):
        resolve_price("box.large", None, custom)


def test_an_unknown_instance_type_is_a_one_line_error_listing_known_ones(capsys) -> None:
    assert main(["--base-url", "http://127.0.0.1:9", "--instance-type", "p5.mega"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: unknown --instance-type 'p5.mega'")
    known = sorted(json.loads(DEFAULT_PRICES.read_text())["instances"])
    assert ", ".join(known) in err


def test_the_report_shows_the_cost(fake_server, tmp_path: Path, capsys) -> None:
    server = fake_server()
    out = tmp_path / "results"
    assert main(["--base-url", server.base_url, "--num-prompts", "4", "--input-len", "8", "--output-len", "4",
                 "--concurrency", "2", "--instance-type", "c7i.xlarge", "--cost-per-hour", "0.2",
                 "--result-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Cost per 1M output tokens ($):" in printed and "c7i.xlarge at $0.2/hour (--cost-per-hour)" in printed
    (result,) = json.loads((out / "server-sweep.json").read_text())
    assert result["instance_type"] == "c7i.xlarge" and result["cost_per_hour"] == 0.2
    assert result["cost_per_million_output_tokens"] == pytest.approx(0.2 / (result["output_throughput"] * 3600) * 1e6)
    input_tps = result["total_input_tokens"] / result["duration"]
    assert result["cost_per_million_input_tokens"] == pytest.approx(0.2 / (input_tps * 3600) * 1e6)
    page = (out / "server.md").read_text()
    assert "$/1M output tok" in page and "$/1M input tok" in page and "| c7i.xlarge | 0.2 |" in page
    assert "cost: c7i.xlarge at $0.2/hour" in page
    assert "Cost per 1M" in format_result(result, (50, 99))
    unpriced = {k: v for k, v in result.items() if "cost" not in k}
    assert "$/1M" not in markdown_table({"server": [unpriced]}, (50, 99))
    assert "Cost per 1M" not in format_result(unpriced, (50, 99))
