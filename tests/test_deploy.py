"""deploy/: every Kubernetes manifest validates against the API schemas (kubernetes-validate, no
cluster), the containers' command lines parse with our own services' parsers, and the
Dockerfile copies every package the distribution installs."""

from __future__ import annotations

import pathlib
import re

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"


def documents() -> list[tuple[str, dict]]:
    return [(f.name, doc) for f in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(f.read_text()) if doc]


def test_every_manifest_validates_strictly():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = documents()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "PodDisruptionBudget",
                                            "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    for name, doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    bad = dict(docs[0][1], spec={"replicas": "two"})  # the check can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def deployments() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Deployment"}


def test_pods_are_probed_drained_and_bounded():
    for name, d in deployments().items():
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert "readinessProbe" in c and "livenessProbe" in c, name
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 0, name
    services = {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == "Service"}
    for model in ("specmesh-verify", "specmesh-draft"):  # client-side balancing over pods
        assert services[model]["spec"]["clusterIP"] == "None"
        assert "preStop" in deployments()[model]["spec"]["template"]["spec"]["containers"][0][
            "lifecycle"]


@pytest.mark.parametrize("name", ["specmesh-verify", "specmesh-draft", "specmesh-cache",
                                  "specmesh-gateway"])
def test_container_args_parse_with_our_parsers(name):
    args = deployments()[name]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "serve"
    service, flags = args[1], [str(a) for a in args[2:]]
    if service in ("verify", "draft"):
        from specmesh.model_service.config import parse_service_args

        config = parse_service_args(f"specmesh serve {service}", flags)
        assert config.host == "0.0.0.0" and config.cache_addr
    elif service == "cache":
        from specmesh.cache_service.config import parse_args

        assert parse_args(flags).host == "0.0.0.0"
    else:
        from specmesh.clients.gateway import build_parser

        parsed = build_parser().parse_args(flags)
        assert parsed.verify_addr.startswith("dns:///") and parsed.http_port == 8000


def test_dockerfile_copies_every_installed_package():
    text = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", text, re.M))
    pyproject = (REPO / "pyproject.toml").read_text()
    dirs = set(re.findall(r'^"specmesh(?:\.\w+)?" = "([\w/]+)"', pyproject, re.M))
    tops = {d.split("/")[0] for d in dirs}
    assert tops and tops <= copied, tops - copied
