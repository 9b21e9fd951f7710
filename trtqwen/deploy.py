"""`trtqwen deploy`: the Helm chart under deploy/helm/trtqwen rendered to plain manifests (Helm's own Go library
through helm-python-sdk: no helm binary, no cluster), each built-in object checked against Kubernetes' schemas."""

from __future__ import annotations

from pathlib import Path

import yaml

from trtqwen.errors import UserError
from trtqwen.files import publishing

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "trtqwen"
KUBE_VERSION = "1.30"
CRD_GROUPS = ("monitoring.coreos.com/",)  # ServiceMonitor, PrometheusRule: the Prometheus operator's, no schema here


def merged_values(values_files: list[Path], sets: list[str]) -> dict:
    """Values files in order, then --set key=value pairs (Helm's own parser), later ones winning."""
    import helm_python

    def merge(a: dict, b: dict) -> dict:
        return {**a, **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
                        for k, v in b.items()}}

    out: dict = {}
    for f in values_files:
        if not Path(f).is_file():
            raise UserError(f"no values file at {f}", "pass a YAML file of the chart's values (deploy/README.md)")
        out = merge(out, yaml.safe_load(Path(f).read_text()) or {})
    for s in sets:
        try:
            out = merge(out, helm_python.parse_set_string(s))
        except helm_python.HelmError as e:
            raise UserError(f"--set {s!r} is not key=value: {e}", "e.g. --set replicaCount=4") from None
    return out


def render(values: dict, name: str = "trtqwen", namespace: str = "default", chart: Path = CHART) -> dict[str, str]:
    """{template file name: manifest} for these values; a bad value is refused with Helm's message."""
    import helm_python
    import kubernetes_validate

    if not (chart / "Chart.yaml").is_file():
        raise UserError(f"the chart is not at {chart}", "it ships with trtqwen's source tree: run from a clone")
    try:
        with helm_python.Chart.load(chart) as c:
            rendered = c.render(values, name=name, namespace=namespace)
    except helm_python.HelmError as e:
        raise UserError(f"the chart refused these values: {e}", "see deploy/README.md for each value") from None
    out = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):  # what `helm install` prints, not a manifest
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        if not docs:
            continue
        for d in docs:
            if not d.get("apiVersion", "").startswith(CRD_GROUPS):
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        out[Path(path).name] = text
    return out


def write_manifests(values_files: list[Path], sets: list[str], out: Path, name: str, namespace: str) -> list[Path]:
    """Render, validate, then publish the whole directory at once (never half a set of manifests)."""
    manifests = render(merged_values(values_files, sets), name, namespace)
    with publishing(out) as tmp:
        for fname, text in manifests.items():
            (tmp / fname).write_text(text)
    return sorted(Path(out) / f for f in manifests)
