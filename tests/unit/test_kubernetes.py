"""The Kubernetes base in deploy/kubernetes/: every object validates against the
Kubernetes schemas offline (kubernetes-validate bundles them), the objects fit together
(selectors, Services, ConfigMap, Secret keys, probes on the metrics port, a PDB per role),
the pods are non-root with a read-only root filesystem, and each pod's command, with its
ordinal as the shard, runs `drstream validate` on the rendered config and passes.

The kustomization is rendered by `render()` below: it takes `resources` only and refuses
any other kustomize field, so a transformer added to the base fails here instead of being
rendered wrong (no kustomize binary is needed in CI).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from drstream.daemon.cli import build_parser
from drstream.daemon.config import parse_config
from drstream.daemon.plugins import installed
from drstream.daemon.shards import shard_log_id

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.30.0"  # the oldest release still supported upstream with the pod-index label
DRSTREAM = Path(sys.executable).parent / "drstream"
ROLES = {"ship": "ship_metrics_listen", "apply": "apply_metrics_listen"}
INDEX_LABEL = "metadata.labels['apps.kubernetes.io/pod-index']"


def render(base: Path = BASE) -> list[dict[str, Any]]:
    kust = yaml.safe_load((base / "kustomization.yaml").read_text())
    extra = set(kust) - {"apiVersion", "kind", "resources"}
    assert not extra, f"render() takes only resources; the base uses {sorted(extra)}"
    docs = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((base / name).read_text()) if d]
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


def statefulset(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return by_kind(docs, "StatefulSet")[f"drstream-{role}"]


def container(sts: dict[str, Any]) -> dict[str, Any]:
    [c] = sts["spec"]["template"]["spec"]["containers"]
    return dict(c)


def config_raw(docs: list[dict[str, Any]]) -> dict[str, Any]:
    data = by_kind(docs, "ConfigMap")["drstream-config"]["data"]["drstream.yaml"]
    return dict(yaml.safe_load(data))


def test_every_object_validates_against_the_kubernetes_schemas(
        docs: list[dict[str, Any]]) -> None:
    assert {d["kind"] for d in docs} >= {"StatefulSet", "ConfigMap", "Secret", "Service",
                                         "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any error


def test_the_schema_check_is_not_vacuous(docs: list[dict[str, Any]]) -> None:
    bad = yaml.safe_load(yaml.safe_dump(statefulset(docs, "ship")))
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = yaml.safe_load(yaml.safe_dump(statefulset(docs, "apply")))
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_statefulset_wiring(docs: list[dict[str, Any]], role: str) -> None:
    sts = statefulset(docs, role)
    spec, pod = sts["spec"], sts["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind(docs, "Service")[spec["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"  # headless: drstream-<role>-K.<service>
    assert service["spec"]["selector"].items() <= labels.items()
    # one pod per shard of the set the config describes
    assert spec["replicas"] == parse_config(config_raw(docs)).shards.count
    pdbs = [p for p in by_kind(docs, "PodDisruptionBudget").values()
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1, pdbs


@pytest.mark.parametrize("role", sorted(ROLES))
def test_probes_and_scrape_on_the_metrics_listener(docs: list[dict[str, Any]],
                                                   role: str) -> None:
    sts = statefulset(docs, role)
    c = container(sts)
    config = parse_config(config_raw(docs))
    listen = getattr(config.service, ROLES[role])
    host, _, port = listen.rpartition(":")
    assert host == "0.0.0.0", f"{ROLES[role]} {listen}: the kubelet probes the pod's address"
    [metrics] = [p for p in c["ports"] if p["name"] == "metrics"]
    assert metrics["containerPort"] == int(port)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ann = sts["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": port,
                   "prometheus.io/path": "/metrics"}
    assert config.shards.port_stride == 0, "every pod listens on the same port"


@pytest.mark.parametrize("role", sorted(ROLES))
def test_pod_security(docs: list[dict[str, Any]], role: str) -> None:
    sts = statefulset(docs, role)
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    c = container(sts)
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/drstream"]["readOnly"] is True
    assert "/tmp" in mounts  # the only writable path, an emptyDir
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert volumes[mounts["/etc/drstream"]["name"]]["configMap"]["name"] == "drstream-config"
    # the drain finishes before the kubelet's SIGKILL: ship's drain deadline is 30 s
    assert pod["terminationGracePeriodSeconds"] >= 60


@pytest.mark.parametrize("role", sorted(ROLES))
def test_resources_are_requested(docs: list[dict[str, Any]], role: str) -> None:
    res = container(statefulset(docs, role))["resources"]
    assert set(res["requests"]) == {"cpu", "memory"}
    assert set(res["limits"]) == {"memory"}  # no CPU limit: throttling stalls the loop
    assert mib(res["limits"]["memory"]) >= 2 * mib(res["requests"]["memory"])


def mib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert m, quantity
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def test_statefulsets_differ_only_by_role(docs: list[dict[str, Any]]) -> None:
    """A security or probe change to one that misses the other fails here."""
    texts = []
    for role in ("ship", "apply"):
        sts = yaml.safe_load(yaml.safe_dump(statefulset(docs, role)))
        sts["spec"]["template"]["spec"]["containers"][0]["resources"] = "per role"
        sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "per role"
        texts.append(re.sub(r"ship|apply|946[45]", "X", yaml.safe_dump(sts)))
    assert texts[0] == texts[1]


def secret_env(docs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet sets it, from the Secret (with a real
    key in place of the placeholder) and literal values; SHARD comes from the ordinal."""
    secret = by_kind(docs, "Secret")
    env = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            data = secret[ref["name"]]["stringData"]
            assert ref["key"] in data, f"{e['name']}: no key {ref['key']} in {ref['name']}"
            env[e["name"]] = data[ref["key"]]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == INDEX_LABEL, e
    return env


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_pods_command_and_config_validate(docs: list[dict[str, Any]], role: str,
                                               tmp_path: Path) -> None:
    sts = statefulset(docs, role)
    c = container(sts)
    config_path = tmp_path / "drstream.yaml"
    config_path.write_text(by_kind(docs, "ConfigMap")["drstream-config"]["data"]
                           ["drstream.yaml"])
    env = secret_env(docs, c)
    refs = re.findall(r"env:([A-Za-z_][A-Za-z0-9_]*)", config_path.read_text())
    assert refs and set(refs) <= set(env), f"config needs {refs}, the pod sets {sorted(env)}"
    env["DRSTREAM_KEY_K1"] = base64.b64encode(os.urandom(32)).decode()
    log_id = config_raw(docs)["log_id"]
    for ordinal in range(sts["spec"]["replicas"]):
        argv = [a.replace("$(SHARD)", str(ordinal)) for a in c["args"]]
        argv = [str(tmp_path / "drstream.yaml") if a == "/etc/drstream/drstream.yaml" else a
                for a in argv]
        assert c["command"] == ["drstream"]
        args = build_parser(installed()).parse_args(argv)  # exits 2 on a bad option
        assert (args.handler, args.shard) == (role, str(ordinal)), argv
        res = subprocess.run([str(DRSTREAM), "validate", args.config, "--shard", args.shard,
                              "--check-keys"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **env}, check=False)
        assert res.returncode == 0, f"pod {ordinal}: {shlex.join(argv)}\n{res.stderr}"
        shard = shard_log_id(log_id, ordinal, sts["spec"]["replicas"])
        assert f"log {shard}" in res.stdout, res.stdout


def test_the_placeholder_key_is_refused(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """A base applied without its Secret replaced never runs with a known key."""
    c = container(statefulset(docs, "ship"))
    config_path = tmp_path / "drstream.yaml"
    config_path.write_text(by_kind(docs, "ConfigMap")["drstream-config"]["data"]
                           ["drstream.yaml"])
    res = subprocess.run([str(DRSTREAM), "validate", str(config_path), "--shard", "0",
                          "--check-keys"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **secret_env(docs, c)}, check=False)
    assert res.returncode == 2, res.stderr
    assert "keyring.keys.k1" in res.stderr and "REPLACE" not in res.stderr


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabeling (keep and replace actions, the defaults) on one target."""
    out = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                out[rule["target_label"]] = match.expand(rule.get("replacement", r"\1"))
        else:
            raise AssertionError(f"relabel action {action} not modelled here")
    return out


def test_prometheus_scrape_job_finds_every_pod_with_its_shard(
        docs: list[dict[str, Any]]) -> None:
    """The job in prometheus-scrape.yaml, applied to the pods the StatefulSets make, keeps
    each pod's metrics port and labels it with role and shard (promtool's Debian build has
    no kubernetes_sd, so the relabeling is evaluated here)."""
    [job] = yaml.safe_load((BASE / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    targets = []
    for role in ROLES:
        sts = statefulset(docs, role)
        for ordinal in range(sts["spec"]["replicas"]):
            labels = {**sts["spec"]["template"]["metadata"]["labels"],
                      "apps.kubernetes.io/pod-index": str(ordinal)}
            for port in container(sts)["ports"] + [{"name": "", "containerPort": 1}]:
                meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-z0-9_]', '_', k)}": v
                        for k, v in labels.items()}
                meta |= {"__meta_kubernetes_pod_container_port_name": port["name"],
                         "__meta_kubernetes_namespace": "dr",
                         "__meta_kubernetes_pod_name": f"drstream-{role}-{ordinal}"}
                found = relabel(job["relabel_configs"], meta)
                if found is not None:
                    targets.append((found["role"], found["shard"], found["pod"]))
    assert sorted(targets) == sorted((r, str(k), f"drstream-{r}-{k}")
                                     for r in ROLES for k in range(3))
