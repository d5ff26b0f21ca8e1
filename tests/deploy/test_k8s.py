"""deploy/k8s/ against the Kubernetes schemas (kubernetes-validate, offline) and against the service and training code
it deploys: env names are real settings, ports and probe paths agree with the app, the autoscaling metric is one the
service exports, the shutdown arithmetic holds, and the training Job's commands parse with torchrun's and the
training CLIs' own argument parsers."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from deployfiles import ROOT, image_reference_pinned, load_compose, parse_dockerfile, settings_env_names, substitute

K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes release the manifests target (the Job's batch.kubernetes.io/job-name label needs 1.27+) and
# the newest whose schemas kubernetes-validate 1.37 bundles: an API version removed upstream fails the second.
KUBERNETES_VERSIONS = ("1.31", "1.37")
NOT_APPLIED = {"secret.example.yaml", "train-job.yaml", "monitoring/prometheus-adapter-rules.yaml"}
SCORERS = (("Deployment", "oct-scorer"), ("StatefulSet", "oct-scorer-pacs"))


def _load_all() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        rel = path.relative_to(K8S).as_posix()
        out += [(rel, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


MANIFESTS = [(rel, doc) for rel, doc in _load_all() if doc.get("kind") != "Kustomization"]


@pytest.fixture(scope="module")
def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def config_maps(kustomization) -> dict[str, dict[str, str]]:
    """The generated ConfigMaps: name → literals."""
    return {g["name"]: dict(lit.split("=", 1) for lit in g["literals"]) for g in kustomization["configMapGenerator"]}


def _get(kind: str, name: str) -> dict:
    found = [d for _, d in MANIFESTS if d["kind"] == kind and d["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _job() -> dict:
    jobs = [d for _, d in MANIFESTS if d["kind"] == "Job"]
    assert len(jobs) == 1
    return jobs[0]


def _container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(container: dict, config_maps: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """The container's environment: envFrom ConfigMaps, then env (a Secret reference reads as None)."""
    env: dict[str, str | None] = {}
    for src in container.get("envFrom", []):
        env.update(config_maps[src["configMapRef"]["name"]])
    for e in container.get("env", []):
        env[e["name"]] = e.get("value")
    return env


def _port(container: dict, port: int | str) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named, f"no container port named {port!r}"
    return named[port]


# --- schemas ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(("rel", "doc"), MANIFESTS, ids=[f"{r}:{d['kind']}" for r, d in MANIFESTS])
def test_manifest_is_valid(rel: str, doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{rel} {doc['kind']} (Kubernetes {version}) at {'/'.join(map(str, e.path))}: {e.message}")


def test_schema_validation_can_fail() -> None:
    """Strict validation is not vacuous: an unknown field and a wrongly typed one are both refused."""
    deployment = _get("Deployment", "oct-scorer")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest_and_pins_the_images(kustomization) -> None:
    files = {p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - NOT_APPLIED
    tags = {i["name"]: i["newTag"] for i in kustomization["images"]}
    assert all(image_reference_pinned(f"{n}:{t}") is None for n, t in tags.items()), tags
    dockerfile_tag = re.search(r"oct-anomaly-scorer:(\S+)", (ROOT / "Dockerfile.gpu").read_text()).group(1)
    assert set(tags.values()) == {dockerfile_tag}, "one release for both images, the one Dockerfile.gpu documents"
    for _, doc in MANIFESTS:
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            name, _, tag = c["image"].partition(":")
            assert tags.get(name) == tag, f"{doc['kind']} {c['name']}: {c['image']} is not the pinned {tags}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl: kustomize build unchecked")
def test_kustomize_build_is_valid() -> None:
    """What `kubectl apply -k` would send: every object valid, in the namespace, with the hashed ConfigMap names."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "oct-anomaly"
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            refs = {e["configMapRef"]["name"] for e in doc["spec"]["template"]["spec"]["containers"][0]["envFrom"]}
            assert refs <= generated and all(re.search(r"-[a-z0-9]{10}$", r) for r in refs), refs


# --- the scorer pods against the service ------------------------------------------------------------------------------


def test_every_oct_name_is_a_setting(config_maps) -> None:
    known = settings_env_names()
    used: set[str] = set()
    for _, doc in MANIFESTS:
        used |= set(re.findall(r"\bOCT_[A-Z0-9_]+\b", yaml.safe_dump(doc)))
    for literals in config_maps.values():
        used |= set(literals)
    used = {n for n in used if n.startswith("OCT_")}
    assert used and not used - known, f"not settings of service/settings.py: {sorted(used - known)}"


@pytest.mark.parametrize(("kind", "name"), SCORERS)
def test_scorer_env_is_valid_settings(kind: str, name: str, config_maps, monkeypatch) -> None:
    """The pod's environment builds the service's Settings: values parse, the version is pinned, the device is cuda."""
    from service.settings import Settings

    for var in list(settings_env_names()):
        monkeypatch.delenv(var, raising=False)
    env = _env(_container(_get(kind, name)), config_maps)
    for k, v in env.items():
        monkeypatch.setenv(k, "from-a-secret" if v is None else v)
    s = Settings(_env_file=None)
    assert isinstance(s.model_version, int), "OCT_MODEL_VERSION must pin a version, not follow `latest`"
    assert s.device == "cuda", "a pod that was given a GPU and cannot see it must fail, not serve on the CPU"
    assert s.host == "0.0.0.0"


@pytest.mark.parametrize(("kind", "name"), SCORERS)
def test_ports_agree(kind: str, name: str, config_maps) -> None:
    workload = _get(kind, name)
    c = _container(workload)
    port = int(_env(c, config_maps)["OCT_PORT"])
    assert [p["containerPort"] for p in c["ports"]] == [port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _port(c, c[probe]["httpGet"]["port"]) == port, probe
    assert int(workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == port
    labels = workload["spec"]["template"]["metadata"]["labels"]
    services = [d for _, d in MANIFESTS if d["kind"] == "Service" and d["spec"].get("selector")
                and d["spec"]["selector"].items() <= labels.items()]
    assert len(services) == 1, f"{name}: expected one Service selecting its pods"
    assert [_port(c, p["targetPort"]) for p in services[0]["spec"]["ports"]] == [port]
    for policy in (d for _, d in MANIFESTS if d["kind"] == "NetworkPolicy"
                   and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()):
        assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]


def test_probe_and_metrics_paths_are_routes_of_the_app() -> None:
    """Asked of the real app (route objects differ across FastAPI releases, answers do not)."""
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import Settings

    client = TestClient(create_app(Settings()), raise_server_exceptions=False)  # no lifespan: alive, no model
    for kind, name in SCORERS:
        workload = _get(kind, name)
        c = _container(workload)
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/healthz"
        metrics_path = workload["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
        r = client.get(metrics_path)
        assert r.status_code == 200 and "oct_queue_depth" in r.text, metrics_path
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", "ready = model loaded"
    assert client.get("/no-such-probe").status_code == 404


def test_both_scorer_tiers_run_the_same_pod() -> None:
    """The StatefulSet differs from the Deployment only by the PACS target, its credentials and its outbox volume."""
    pods = []
    for kind, name in SCORERS:
        spec = copy.deepcopy(_get(kind, name)["spec"]["template"]["spec"])
        c = spec["containers"][0]
        c["env"] = [e for e in c["env"] if not e["name"].startswith("OCT_PACS_")]
        c["envFrom"] = [e for e in c["envFrom"] if e["configMapRef"]["name"] == "oct-scorer-config"]
        spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "results"]
        pods.append(spec)
    assert pods[0] == pods[1]


@pytest.mark.parametrize(("kind", "name"), SCORERS)
def test_gpu_security_and_resources(kind: str, name: str) -> None:
    pod = _get(kind, name)["spec"]["template"]["spec"]
    c = _container(_get(kind, name))
    # Extended resources cannot be overcommitted: Kubernetes wants request == limit.
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    uid = int(parse_dockerfile(ROOT / "Dockerfile.gpu").stage("serve").all("USER")[-1].args.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == uid
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize(("kind", "name"), SCORERS)
def test_shutdown_outlasts_endpoint_removal_and_the_longest_request(kind: str, name: str, config_maps) -> None:
    """grace ≥ time kept serving while endpoints are removed (a preStop sleep if any, plus the service's own drain
    delay, OCT_DRAIN_DELAY_S) + the longest request (compose's stop_grace_period) + 5 s to exit."""
    pod = _get(kind, name)["spec"]["template"]["spec"]
    c = _container(_get(kind, name))
    command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert command[0] == "sleep"
    from service.settings import Settings

    drain_s = _env(c, config_maps).get("OCT_DRAIN_DELAY_S") or Settings.model_fields["drain_delay_s"].default
    serving_s = int(command[1]) + float(drain_s)
    assert serving_s >= 5, "endpoint removal takes seconds to reach every node"
    compose = load_compose(ROOT / "docker-compose.yml")
    longest_s = int(compose["services"]["scorer"]["stop_grace_period"].removesuffix("s"))
    assert pod["terminationGracePeriodSeconds"] >= serving_s + longest_s + 5


@pytest.mark.parametrize(("kind", "name"), SCORERS)
def test_model_store_is_a_read_only_volume_and_secrets_come_from_secrets(kind: str, name: str, config_maps) -> None:
    pod = _get(kind, name)["spec"]["template"]["spec"]
    c = _container(_get(kind, name))
    env = _env(c, config_maps)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    store = mounts[env["OCT_MODEL_STORE"]]
    assert store["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == store["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "oct-model-store"
    for e in c["env"]:
        if re.search(r"KEYS|PASSWORD|TOKEN|USERNAME", e["name"]):
            assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{e['name']} must come from a Secret"
    keys = next(e for e in c["env"] if e["name"] == "OCT_API_KEYS")["valueFrom"]["secretKeyRef"]
    assert not keys.get("optional", False), "without API keys the pod must not start"


def test_secret_example_carries_no_values() -> None:
    secret = _get("Secret", "oct-scorer-secrets")
    assert set(secret.get("stringData", {}).values()) <= {""} and not secret.get("data")
    used = {e["valueFrom"]["secretKeyRef"]["key"] for kind, name in SCORERS for e in _container(_get(kind, name))["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert used == set(secret["stringData"]), "the example lists exactly the keys the pods read"


def test_outbox_one_durable_volume_per_replica_and_only_the_pacs_tier_delivers(config_maps) -> None:
    api, pacs = (_get(k, n) for k, n in SCORERS)
    assert "OCT_PACS_STOW_URL" not in _env(_container(api), config_maps), "the API tier's outbox is not durable"
    pacs_env = _env(_container(pacs), config_maps)
    assert pacs_env["OCT_PACS_STOW_URL"].startswith("http")
    claims = {t["metadata"]["name"] for t in pacs["spec"]["volumeClaimTemplates"]}
    results = next(m for m in _container(pacs)["volumeMounts"] if m["mountPath"] == pacs_env["OCT_RESULTS_DIR"])
    assert results["name"] in claims, "the outbox must be on the replica's own PersistentVolumeClaim"
    assert pacs["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"


def test_rolling_update_never_drops_below_the_replica_count() -> None:
    strategy = _get("Deployment", "oct-scorer")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_disruption_budgets_and_network_policies_select_the_scorer_pods() -> None:
    for kind, name in SCORERS:
        labels = _get(kind, name)["spec"]["template"]["metadata"]["labels"]
        pdbs = [d for _, d in MANIFESTS if d["kind"] == "PodDisruptionBudget"
                and d["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1
        policies = [d for _, d in MANIFESTS if d["kind"] == "NetworkPolicy"
                    and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert len(policies) == 1 and policies[0]["spec"]["policyTypes"] == ["Ingress"]
        sources = [p["podSelector"]["matchLabels"] for rule in policies[0]["spec"]["ingress"] for p in rule["from"]]
        assert {"app.kubernetes.io/name": "prometheus"} in sources
        assert len(sources) == 2
    pacs_policy = _get("NetworkPolicy", "oct-scorer-pacs")
    assert {"oct-anomaly/role": "pacs-router"} in [p["podSelector"]["matchLabels"]
                                                  for r in pacs_policy["spec"]["ingress"] for p in r["from"]]


def test_autoscaling_metric_is_exported_by_the_service_and_served_by_the_adapter() -> None:
    from service.metrics import Metrics

    hpa = _get("HorizontalPodAutoscaler", "oct-scorer")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "oct-scorer"}
    assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot satisfy the PodDisruptionBudget"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    families = {f.name: f.type for f in Metrics().registry.collect()}
    assert families.get(name) == "gauge", f"{name} is not a gauge of service/metrics.py: {families}"

    adapter = yaml.safe_load(_get("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    rules = [r for r in adapter["rules"] if r["name"]["as"] == name]
    assert len(rules) == 1
    rule = rules[0]
    assert re.match(r"^([a-z_:]+)\{", rule["seriesQuery"]).group(1) == name
    assert re.fullmatch(rule["name"]["matches"], name)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a Pods metric needs namespace and pod"


# --- the training Job -------------------------------------------------------------------------------------------------


def _commands(script: str, variables: dict[str, str]) -> list[list[str]]:
    """The script's torchrun and `python -m` commands as argument lists, with shell variables substituted."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        line = line.strip()
        m = re.fullmatch(r"([a-z_]+)=(.*)", line)
        if m and m.group(1) not in variables:
            variables[m.group(1)] = substitute(m.group(2).strip('"'), variables)
        elif line.startswith(("torchrun ", "python ")):
            out.append(shlex.split(substitute(substitute(line, variables), variables)))
    return out


@pytest.mark.parametrize("resuming", [False, True])
def test_training_job_commands_parse(resuming: bool, config_maps) -> None:
    from torch.distributed.run import get_args_parser

    job = _job()
    pod = job["spec"]["template"]["spec"]
    c = _container(job)
    assert c["command"][0] == "bash" and len(c["args"]) == 1
    syntax = subprocess.run(["bash", "-n"], input=c["args"][0], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    job_name = "oct-train-x7k2q"
    variables = {**env, "JOB_NAME": job_name, "JOB_COMPLETION_INDEX": "0",
                 "last": f"/runs/{job_name}/2026-01-01_00-00-00/last.ckpt" if resuming else "",
                 "run": f"/runs/{job_name}/2026-01-01_00-00-00"}
    commands = _commands(c["args"][0], variables)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus

    modules = []
    for words in commands:
        if words[0] == "torchrun":
            launch = get_args_parser().parse_args(words[1:])
            assert launch.module
            modules.append(launch.training_script)
            assert int(launch.nproc_per_node) == gpus, "one process per GPU of the pod"
            assert launch.nnodes == str(job["spec"]["completions"]) == str(job["spec"]["parallelism"])
            host, port = launch.rdzv_endpoint.rsplit(":", 1)
            assert host == f"{job_name}-0.{pod['subdomain']}", "node 0 of an Indexed Job hosts the rendezvous"
            rdzv = _get("Service", pod["subdomain"])
            assert rdzv["spec"]["clusterIP"] == "None"
            assert rdzv["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
            assert int(port) in [p["port"] for p in rdzv["spec"]["ports"]]
            script_args = launch.training_script_args
        else:
            assert words[:3] == ["python", "-m", "training.export"], words
            modules.append("training.export")
            script_args = words[3:]
        module = importlib.import_module(modules[-1])
        args = module.build_parser().parse_args(script_args)
        if hasattr(module, "validate_args"):
            module.validate_args(args)
        if modules[-1] == "training.train":
            world = int(launch.nnodes) * int(launch.nproc_per_node)
            assert args.batch_size % world == 0, "--batch_size is the global batch: it must divide by the ranks"
            assert Path(args.output_dir).parent == Path(mounts["runs"]) and args.data_root == mounts["data"]
            assert (args.resume is not None) == resuming
        if modules[-1] == "training.export":
            assert args.model_store == mounts["model-store"]
            assert args.version == int(env["EXPORT_VERSION"])
            # The scorers serve the shipped model, which the image carries; the Job's model has a name of its own,
            # and the pinned version is the one it exports, so serving it is setting OCT_MODEL_NAME to that name.
            from service.settings import SHIPPED_MODEL

            scorer_config = config_maps["oct-scorer-config"]
            assert scorer_config["OCT_MODEL_NAME"] == SHIPPED_MODEL != args.name == env["EXPORT_NAME"]
            assert int(scorer_config["OCT_MODEL_VERSION"]) == args.version
    assert modules == ["training.train", "training.train_prior", "training.export"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims["model-store"] == "oct-model-store", "the Job exports into the store the scorers read"
    assert pod["securityContext"]["runAsNonRoot"] is True
