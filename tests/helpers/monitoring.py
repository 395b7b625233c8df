"""The metric names that k8s/monitoring uses, and the naming rule of docs/TELEMETRY.md they follow.

Cloud Monitoring names an OpenTelemetry metric by the path it took (AIPROD_OTEL_EXPORTER): "collector"
(OTLP → collector → Managed Service for Prometheus, the GKE default) or "direct" (the Cloud
Monitoring exporter). Alert policies, SLOs and the dashboard must name what really arrives.
"""

import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# The kustomizations that render each variant of the monitoring resources.
MONITORING = {"collector": ROOT / "k8s" / "monitoring", "direct": ROOT / "k8s" / "monitoring" / "direct"}
VARIANTS = tuple(MONITORING)
KINDS = ("counter", "updown", "gauge", "histogram")

COLLECTOR_PREFIX = "prometheus.googleapis.com/"
DIRECT_PREFIX = "workload.googleapis.com/"
# In a Monitoring filter: metric.type = "…".
_FILTER_TYPE = re.compile(r'metric\.type\s*=\s*"([^"]+)"')
# In PromQL the resources always select the metric by name: {__name__="…"} (the only form that also
# takes the direct path's names as they are).
_PROMQL_NAME = re.compile(r'__name__\s*=\s*"([^"]+)"')
# The series PromQL reads of a histogram (a Cloud Monitoring distribution).
_HISTOGRAM_SERIES = ("_count", "_sum", "_bucket")


def arriving_name(otel_name: str, kind: str, unit: str, variant: str) -> str:
    """The metric type under which an OpenTelemetry metric arrives in Cloud Monitoring, by the rule
    of docs/TELEMETRY.md. kind is counter (monotonic), updown, gauge or histogram."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if variant == "direct":
        return DIRECT_PREFIX + otel_name
    if variant != "collector":
        raise ValueError(f"unknown variant {variant!r}")
    name = otel_name.replace(".", "_")
    if unit == "s":
        name += "_seconds"
    if kind == "counter":
        name += "_total"
    suffix = {"counter": "counter", "updown": "gauge", "gauge": "gauge", "histogram": "histogram"}[kind]
    return f"{COLLECTOR_PREFIX}{name}/{suffix}"


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize directory`, parsed."""
    output = subprocess.run(
        ["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True
    ).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def strings(value: object) -> list[str]:
    """Every string inside a parsed resource."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in strings(item)]
    return []


def promql_metric_type(name: str, variant: str) -> str:
    """The metric type behind a name PromQL selects: a histogram's series carry a suffix; on the
    collector path counters end in _total and the rest are gauges."""
    stem = next((name.removesuffix(s) for s in _HISTOGRAM_SERIES if name.endswith(s)), None)
    if variant == "direct":
        return stem or name
    if stem is not None:
        return f"{COLLECTOR_PREFIX}{stem}/histogram"
    return f"{COLLECTOR_PREFIX}{name}/{'counter' if name.endswith('_total') else 'gauge'}"


def types_in(text: str, variant: str) -> set[str]:
    """The metric types one filter or PromQL query names."""
    return set(_FILTER_TYPE.findall(text)) | {
        promql_metric_type(name, variant) for name in _PROMQL_NAME.findall(text)
    }


def metric_types(variant: str) -> set[str]:
    """Every metric type named anywhere in the rendered k8s/monitoring resources of one variant
    ("collector" or "direct"): alert filters and queries, SLO distribution filters, dashboard charts."""
    return {
        metric_type
        for resource in render(MONITORING[variant])
        for text in strings(resource)
        for metric_type in types_in(text, variant)
    }
