"""The monitoring pack in monitoring/: promtool checks and unit-tests the alert rules, each
alert has a case that fires and one that stays quiet, the dashboard's queries are valid
PromQL, the metric table in monitoring/README.md is what drstream registers, and the PromQL
metric-name reader that the scrape test relies on reads what it must.

promtool comes from Debian's `prometheus` package (`make install` and `.ci/run` install it
with `.ci/install-tools.sh`); when it is missing these tests fail, never skip.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promql import PromQLError, grafana_expr, metric_names

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "drstream-rules.yml"
RULE_TESTS = MONITORING / "drstream-rules.test.yml"
DASHBOARD = MONITORING / "drstream-dashboard.json"
README = MONITORING / "README.md"
# Series Prometheus writes itself for every scrape target, not exported by drstream.
PROMETHEUS_SERIES = {"up"}


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing (Debian: apt-get install -y prometheus, or "
                    "bash .ci/install-tools.sh)")
    return exe


def run_promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, check=False)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[str]:
    """Every panel query with the dashboard's own variables (textbox defaults) filled in."""
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v["query"] for v in dash["templating"]["list"]
                 if v["type"] == "textbox"}
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(grafana_expr(target["expr"], variables))
    assert exprs, "the dashboard has no queries"
    return exprs


def monitored_names() -> tuple[set[str], set[str]]:
    """(metric names the dashboard queries, metric names the rules use)."""
    dash = {n for e in dashboard_exprs() for n in metric_names(e)}
    rules = {n for r in alert_rules() for n in metric_names(str(r["expr"]))}
    return dash, rules


# --------------------------------------------------------------------------- promtool


def test_rules_pass_promtool_check() -> None:
    res = run_promtool("check", "rules", RULES.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout, res.stdout


def test_scrape_config_pass_promtool_check() -> None:
    res = run_promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert RULES.name in config["rule_files"]
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert jobs == {"drstream-ship", "drstream-apply"}, jobs
    for name in jobs:  # the rules select on exactly these job names
        assert f'job="{name}"' in RULES.read_text()


def test_rule_unit_tests_pass() -> None:
    res = run_promtool("test", "rules", RULE_TESTS.name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout, res.stdout


def _with_expr(tmp_path: Path, alert: str, expr: str) -> subprocess.CompletedProcess[str]:
    """promtool test rules, on a copy where one alert's expression is replaced."""
    doc = yaml.safe_load(RULES.read_text())
    hits = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert len(hits) == 1
    hits[0]["expr"] = expr
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)


# An expression that never fires, and one that always does: each must break a rule test.
MUTATIONS = {"firing": "vector(1) > 2", "quiet": "vector(1)"}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
@pytest.mark.parametrize("alert", [r["alert"] for r in alert_rules()])
def test_every_alert_has_a_firing_and_a_quiet_case(tmp_path: Path, alert: str,
                                                   case: str) -> None:
    res = _with_expr(tmp_path, alert, MUTATIONS[case])
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"{alert}: no rule test has a {case} case\n{out}"
    assert f"alertname: {alert}," in out, out


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule): a typo fails here."""
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run_promtool("check", "rules", path.name, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dashboard_panels_are_placed_and_unique() -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles)), titles
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]


# --------------------------------------------------------------------------- metric table


def registered_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Scraped name -> (type, label names) of everything in drstream's registry."""
    import drstream.connectors.kafka.source
    import drstream.connectors.mlflow.source
    import drstream.connectors.mlflow.webhook
    import drstream.connectors.s3.notify  # noqa: F401  (each registers its metrics on import)
    from drstream.daemon.metrics import REGISTRY

    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for collector in list(REGISTRY._collector_to_names):
        if hasattr(collector, "_labelnames"):
            kind = collector._type
            name = collector._name + ("_total" if kind == "counter" else "")
            out[name] = (kind, tuple(collector._labelnames))
        else:  # ProcessCollector: no labels
            for family in collector.collect():
                suffix = "_total" if family.type == "counter" else ""
                out[family.name + suffix] = (family.type, ())
    return out


def documented_metrics() -> dict[str, tuple[str, tuple[str, ...]]]:
    rows = re.findall(r"^\| `([a-z0-9_:]+)` \| (\w+) \| ([^|]+) \|", README.read_text(), re.M)
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, kind, labels in rows:
        assert name not in out, f"{name} documented twice"
        out[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)))
    return out


def test_readme_documents_every_metric_and_no_other() -> None:
    registered, documented = registered_metrics(), documented_metrics()
    assert set(registered) - set(documented) == set(), "registered, not documented"
    assert set(documented) - set(registered) == set(), "documented, not registered"
    for name, (kind, labels) in registered.items():
        assert documented[name] == (kind, labels), f"{name}: README says {documented[name]}"


def test_monitoring_uses_only_registered_metrics() -> None:
    """The static half of the scrape test: names the pack uses exist in the registry."""
    exposed = set()
    for name, (kind, _) in registered_metrics().items():
        exposed |= {name + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" \
            else {name}
    dash, rules = monitored_names()
    assert dash - exposed == set()
    assert rules - exposed - PROMETHEUS_SERIES == set()


# --------------------------------------------------------------------------- PromQL reader


@pytest.mark.parametrize(("expr", "names"), [
    ("up == 0", {"up"}),
    ('drstream_ready{job="a", instance=~"b.*"} == 0', {"drstream_ready"}),
    ("histogram_quantile(0.99, sum by (le, job) (rate(x_bucket[5m])))", {"x_bucket"}),
    ("sum(rate(a_total[1m])) by (job) / on (job) group_left (log_id) b", {"a_total", "b"}),
    ("count by (log_id) (drstream_info{role=\"ship\"}) > 1", {"drstream_info"}),
    ("a unless a offset 1h or increase(a[1h]) > 0", {"a"}),
    ("changes(p{job=~\"x|y\"}[15m]) >= 3 and bool q", {"p", "q"}),
    ('label_replace(m, "dst", "$1 by (x)", "src", "(.*)")', {"m"}),
    ("max_over_time(m[5m:30s]) * 1e3 + 0x1F - .5", {"m"}),
    ('{__name__="named"} + without_prefix_metric', {"named", "without_prefix_metric"}),
    ("time() - (t > 0)", {"t"}),
    ("topk(3, sum without (instance) (c)) and ignoring (x) d", {"c", "d"}),
    ("m @ end() offset 5m", {"m"}),
    ("inf > nan", set()),
])
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


@pytest.mark.parametrize("expr", ["a $b", "sum(a", '{__name__=~"x.*"}', "a ; b"])
def test_unreadable_promql_is_an_error(expr: str) -> None:
    with pytest.raises(PromQLError):
        metric_names(expr)


def test_grafana_variables() -> None:
    assert grafana_expr('rate(a{job="$job"}[$__rate_interval])', {"job": "j"}) == \
        'rate(a{job="j"}[5m])'
    assert grafana_expr("b{job=~\"${x}|$x\"}", {"x": "y"}) == 'b{job=~"y|y"}'
    with pytest.raises(PromQLError):
        grafana_expr("c{job=\"$nope\"}", {})
