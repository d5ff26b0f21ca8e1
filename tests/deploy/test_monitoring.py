"""Prometheus scrapes what the service serves, and every metric the Grafana dashboard queries is one the service's
Metrics registry exposes (names read from service/metrics.py at test time)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import yaml
from deployfiles import ROOT, env_dict, interpolate, load_compose, port_target, strip_tags, volume_mounts
from fastapi.testclient import TestClient

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "oct.json"
PROVISIONING = ROOT / "docker" / "grafana" / "provisioning"

# Sample names prometheus_client exposes for a family of each type (a counter family `x` is exposed as x_total).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return strip_tags(load_compose(ROOT / "docker-compose.yml"))


@pytest.fixture(scope="module")
def exposed_metrics() -> set[str]:
    """Every sample name the service's /metrics can carry, GPU gauges included."""
    try:
        from service.metrics import Metrics
    except ModuleNotFoundError as e:
        if e.name == "service.metrics":
            pytest.skip("service/metrics.py does not exist yet")
        raise
    m = Metrics()
    if hasattr(m, "track_gpu"):
        m.track_gpu()  # registers the GPU memory gauges (their values are only read when rendering)
    names = set()
    for family in m.registry.collect():
        names.update(family.name + s for s in _SUFFIXES[family.type])
    return names


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The real app, without its lifespan: no model is loaded, so it is alive but not ready."""
    from service.main import create_app
    from service.settings import Settings

    yield TestClient(create_app(Settings()), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    return out


def test_prometheus_scrapes_the_scorer_metrics_endpoint(compose, client) -> None:
    prom = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    scorer = compose["services"]["scorer"]
    port = int(env_dict(scorer["environment"])["OCT_PORT"])
    assert port in [port_target(p) for p in scorer["ports"]]
    jobs = [j for j in prom["scrape_configs"] if j["job_name"] == "oct-scorer"]
    assert len(jobs) == 1
    job = jobs[0]
    path = job.get("metrics_path", "/metrics")
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), (path, r.status_code)
    assert "oct_" in r.text
    targets = [(name, sd["port"]) for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
    targets += [tuple(t.rsplit(":", 1)) for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert targets, "the scorer job has no targets"
    for host, target_port in targets:
        assert host in compose["services"], f"{host} is not a compose service"
        assert int(target_port) == port, f"Prometheus scrapes {host}:{target_port}, the service listens on {port}"


def test_probe_paths_answer_as_the_healthcheck_expects(client) -> None:
    """The container healthcheck probes /readyz: it must answer, and not 200 while no model is loaded."""
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503, r.status_code


def test_prometheus_mount_and_port(compose) -> None:
    prom = compose["services"]["prometheus"]
    mounts = {src: tgt for src, tgt, _ in volume_mounts(prom)}
    assert mounts["./docker/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert 9090 in [port_target(p) for p in prom["ports"]]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(compose, dashboard) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {src: tgt for src, tgt, _ in volume_mounts(grafana)}
    prov_target = mounts["./docker/grafana/provisioning"]
    dash_target = mounts["./docker/grafana/dashboards"]
    assert prov_target == "/etc/grafana/provisioning"

    ds_files = list((PROVISIONING / "datasources").glob("*.yml"))
    datasources = [d for f in ds_files for d in yaml.safe_load(f.read_text())["datasources"]]
    assert len(datasources) == 1
    ds = datasources[0]
    assert ds["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([\w.-]+):(\d+)/?", ds["url"]).groups()
    assert host in compose["services"] and "prometheus" in compose["services"][host]["image"]
    assert int(port) == 9090

    providers = [p for f in (PROVISIONING / "dashboards").glob("*.yml")
                 for p in yaml.safe_load(f.read_text())["providers"]]
    assert [p["options"]["path"] for p in providers] == [dash_target]
    home = env_dict(grafana["environment"]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home == f"{dash_target}/{DASHBOARD.name}"

    uids = {json.dumps(p.get("datasource")) for p in dashboard["panels"]}
    uids |= {json.dumps(t.get("datasource")) for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {json.dumps({"type": "prometheus", "uid": ds["uid"]})}


def test_dashboard_queries_only_metrics_the_service_exposes(dashboard, exposed_metrics) -> None:
    exprs = _exprs(dashboard)
    assert exprs
    unknown = set()
    for title, expr in exprs:
        used = set(re.findall(r"\boct_[a-z0-9_]+", expr))
        assert used, f"panel {title!r} queries no oct_ metric: {expr}"
        unknown |= {(title, u) for u in used - exposed_metrics}
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{title}: {expr}"
    assert not unknown, f"dashboard queries metrics the service does not expose: {sorted(unknown)}"


def test_dashboard_covers_the_operational_questions(dashboard) -> None:
    exprs = " ".join(e for _, e in _exprs(dashboard))
    for needed in ("oct_requests_total", "oct_request_duration_seconds_bucket", "oct_batch_size_",
                   "oct_queue_depth", "oct_anomalies_total", "oct_gpu_memory_", "oct_queue_wait_seconds_bucket",
                   "oct_inference_seconds_bucket", "oct_model_info"):
        assert needed in exprs, f"no panel uses {needed}"
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs, "p50 and p99 latency"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_metric_check_can_fail(exposed_metrics) -> None:
    """The name check is not vacuous: the registry is populated and a misspelt metric is not in it."""
    assert "oct_requests_total" in exposed_metrics
    assert "oct_request_duration_seconds_bucket" in exposed_metrics
    assert "oct_request_total" not in exposed_metrics


def test_grafana_has_no_default_password_and_no_anonymous_access(compose) -> None:
    env = env_dict(compose["services"]["grafana"]["environment"])
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")  # compose refuses when unset
    assert interpolate(env["GF_AUTH_ANONYMOUS_ENABLED"]) == "false"  # unless GRAFANA_ANONYMOUS=true asks for it
