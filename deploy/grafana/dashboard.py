"""Writes deploy/grafana/realm.json, the Grafana dashboard of a Realm fleet.

The dashboard is built with Grafana's own Foundation SDK (types generated
from Grafana's dashboard schema), so what it writes is schema-valid by
construction; scripts/check-deploy.sh regenerates it and fails when the
committed JSON differs. Every metric named here is one realm-host exports
(tests/deploy.rs checks the names against a live /metrics).

    python deploy/grafana/dashboard.py > deploy/grafana/realm.json
"""

import json
import sys

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")

# Panel ids, unique within the dashboard (rows included).
_ids = iter(range(1, 1000))


def row(title: str) -> dashboard.Row:
    return dashboard.Row(title).id(next(_ids))


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


def series(title: str, unit: str, *queries: prometheus.Dataquery, width: int = 12):
    panel = timeseries.Panel().id(next(_ids)).title(title).datasource(PROMETHEUS).unit(unit)
    panel = panel.span(width).height(8)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def number(title: str, unit: str, expr: str):
    return (
        stat.Panel()
        .id(next(_ids))
        .title(title)
        .datasource(PROMETHEUS)
        .unit(unit)
        .span(6)
        .height(4)
        .with_target(query(expr, title))
    )


def build() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("Realm")
        .uid("realm-fleet")
        .tags(["realm"])
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
    )
    board = (
        board.with_row(row("Fleet"))
        .with_panel(number("Hosts up", "short", 'sum(up{job="realm"})'))
        .with_panel(number("Redis reachable (hosts)", "short", "sum(realm_fleet_redis_up)"))
        .with_panel(number("Requests waiting", "short", 'sum(vllm:num_requests_waiting)'))
        .with_panel(number("Requests running", "short", 'sum(vllm:num_requests_running)'))
    )
    board = (
        board.with_row(row("Traffic"))
        .with_panel(
            series(
                "Requests per second by kind",
                "reqps",
                query("sum by (kind) (rate(realm_requests_total[1m]))", "{{kind}}"),
            )
        )
        .with_panel(
            series(
                "Errors per second by code",
                "reqps",
                query("sum by (code) (rate(realm_errors_total[1m]))", "{{code}}"),
            )
        )
        .with_panel(
            series(
                "Tokens per second",
                "short",
                query("sum by (direction) (rate(realm_tokens_total[1m]))", "{{direction}}"),
            )
        )
        .with_panel(
            series(
                "Tokens per second by tenant (top 10)",
                "short",
                query("topk(10, sum by (tenant) (rate(realm_tokens_total[5m])))", "{{tenant}}"),
            )
        )
    )
    board = (
        board.with_row(row("Latency"))
        .with_panel(
            series(
                "Time to first token",
                "s",
                query(
                    "histogram_quantile(0.5, sum by (le) (rate(realm_time_to_first_token_seconds_bucket[5m])))",
                    "p50",
                ),
                query(
                    "histogram_quantile(0.99, sum by (le) (rate(realm_time_to_first_token_seconds_bucket[5m])))",
                    "p99",
                ),
            )
        )
        .with_panel(
            series(
                "Time between tokens",
                "s",
                query(
                    "histogram_quantile(0.5, sum by (le) (rate(realm_token_latency_seconds_bucket[5m])))",
                    "p50",
                ),
                query(
                    "histogram_quantile(0.99, sum by (le) (rate(realm_token_latency_seconds_bucket[5m])))",
                    "p99",
                ),
            )
        )
    )
    board = (
        board.with_row(row("Capacity"))
        .with_panel(
            series(
                "Queue by host",
                "short",
                query("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
                query("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
            )
        )
        .with_panel(
            series(
                "KV cache in use by host",
                "percentunit",
                query("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}"),
            )
        )
        .with_panel(
            series(
                "Model memory by host",
                "bytes",
                query("sum by (instance) (realm_model_loaded_bytes)", "{{instance}}"),
            )
        )
        .with_panel(
            series(
                "Limit refusals per second",
                "reqps",
                query(
                    'sum by (code) (rate(realm_errors_total{code=~"rate_limited|quota_exceeded|too_many_streams|overloaded"}[1m]))',
                    "{{code}}",
                ),
                query("sum(rate(realm_fleet_redis_errors_total[1m]))", "Redis errors"),
            )
        )
    )
    return board.build()


if __name__ == "__main__":
    json.dump(build(), sys.stdout, cls=JSONEncoder, indent=2, sort_keys=True)
    sys.stdout.write("\n")
