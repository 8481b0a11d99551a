"""A real Prometheus (Debian's, `scripts/ensure-prometheus.sh`) scrapes a running stack with the metrics
token, sees `conveyor_jobs_finished_total` rise as jobs run, evaluates the alert rules of
deploy/monitoring without an error, and answers every query of the Grafana dashboard; `promtool`
accepts the rules, their unit tests and the scrape configuration."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import METRIC_SERIES, METRICS_TOKEN, Stack, eventually, free_port, submit, wait_for_status
from prometheus_server import PrometheusServer, binary

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
JOBS = {"conveyor-gateway", "conveyor-progress", "conveyor-worker"}
# Grafana's own variable, which Prometheus does not know; a window Prometheus takes in its place.
GRAFANA_RATE_INTERVAL = "$__rate_interval"
RATE_WINDOW = "1m"
JOB_TIMEOUT_S = 90
# Scrapes every 2 s (prometheus_server.SCRAPE_INTERVAL): a change shows within a few.
SCRAPE_WAIT_S = 60


def host_port(url: str) -> str:
    return url.split("://", 1)[1]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def promtool(*args: str, cwd: Path = MONITORING) -> str:
    done = subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("database_kind", ["sqlite"], indirect=True)
async def test_a_real_prometheus_sees_jobs_finish(stack: Stack, tmp_path: Path) -> None:
    targets = {
        "conveyor-gateway": [host_port(stack.gateway_url)],
        "conveyor-progress": [host_port(stack.progress_url)],
        "conveyor-worker": [host_port(stack.worker_metrics_url())],
    }
    directory = tmp_path / "prometheus"
    directory.mkdir()
    with PrometheusServer(directory, free_port(), targets, METRICS_TOKEN, rule_files=[ALERTS]) as prometheus:

        async def every_target_up() -> bool:
            up = await prometheus.query("up")
            return {sample["metric"]["job"] for sample in up if sample["value"][1] == "1"} == JOBS

        await eventually(every_target_up, SCRAPE_WAIT_S, "Prometheus to scrape all three services")
        finished = 'sum(conveyor_jobs_finished_total{outcome="succeeded"})'
        before = await prometheus.scalar(finished)

        async with stack.client() as client:
            jobs = [await submit(client, {"type": "demo.echo", "payload": {"n": n}}) for n in range(5)]
            for job in jobs:
                await wait_for_status(client, job["id"], {"succeeded"}, JOB_TIMEOUT_S)

        async def risen() -> bool:
            return await prometheus.scalar(finished) >= before + 5

        await eventually(risen, SCRAPE_WAIT_S, "conveyor_jobs_finished_total to rise by 5 in Prometheus")
        # The gateway's series too (another target, scraped on its own schedule).
        for expr, expected in (
            ('sum(conveyor_jobs_submitted_total{type="demo.echo"})', 5),
            ("count(max by (priority) (conveyor_consumer_lag_messages))", 5),
        ):
            await eventually(
                functools.partial(_is, prometheus, expr, expected), SCRAPE_WAIT_S, f"{expr} == {expected}"
            )

        # Every query of the dashboard is one Prometheus runs.
        for expr in dashboard_queries():
            await prometheus.query(expr.replace(GRAFANA_RATE_INTERVAL, RATE_WINDOW))

        # The alert rules are loaded and evaluate without an error; on a healthy stack none fires.
        async def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = (await prometheus.api("rules"))["groups"]
            rules: list[dict[str, Any]] = [rule for group in groups for rule in group["rules"]]
            return (
                rules
                if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)
                else None
            )

        rules = await eventually(rules_evaluated, SCRAPE_WAIT_S, "the alert rules to be evaluated")
        assert {rule["name"] for rule in rules} == {
            "ConveyorOutboxNotDraining",
            "ConveyorConsumerLagGrowing",
            "ConveyorDeadLetters",
            "ConveyorNoWorkerAlive",
            "ConveyorHigh5xxRate",
        }
        assert all(rule["health"] == "ok" for rule in rules), rules
        assert [rule["name"] for rule in rules if rule["state"] != "inactive"] == []


async def _is(prometheus: PrometheusServer, expr: str, expected: float) -> bool:
    return await prometheus.scalar(expr) == expected


def test_promtool_accepts_the_rules_their_tests_and_the_local_scrape_config(tmp_path: Path) -> None:
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")
    # The local configuration as it sits in a checkout where `make run` has made the token.
    checkout = tmp_path / "checkout"
    shutil.copytree(MONITORING, checkout / "deploy" / "monitoring")
    (checkout / "data").mkdir()
    (checkout / "data" / "metrics-token").write_text(METRICS_TOKEN)
    promtool("check", "config", "prometheus-local.yml", cwd=checkout / "deploy" / "monitoring")


def test_the_configs_rules_and_dashboard_agree_on_jobs_and_series() -> None:
    """Debian's Prometheus has no Kubernetes discovery, so promtool cannot check prometheus.yml; its
    jobs are checked here: the ones the rules and the dashboard select on, scraped with the token."""
    for name in ("prometheus.yml", "prometheus-local.yml"):
        config = yaml.safe_load((MONITORING / name).read_text())
        assert config["rule_files"] == ["alerts.yml"]
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        # `conveyor run`'s own job (the autoscaler's gauge) is only where `conveyor run` is.
        assert set(jobs) - {"conveyor-run"} == JOBS, name
        assert all("credentials_file" in job["authorization"] for job in jobs.values()), name
    queries = dashboard_queries() + [
        rule["expr"] for rule in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    ]
    selected_jobs = {job for query in queries for job in re.findall(r'job="([^"]+)"', query)}
    assert selected_jobs <= JOBS
    # The dashboard shows every series the issue lists.
    shown = " ".join(dashboard_queries())
    assert [name for name in METRIC_SERIES if name.removesuffix("_total") not in shown] == []
