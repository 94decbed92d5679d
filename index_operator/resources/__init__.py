"""PURE builders: custom resources (+ observed state) in, Kubernetes manifests out."""

from index_operator.resources.common import Cluster, dns_name, service_name, service_url
from index_operator.resources.jobs import (
    desired_backfill_job,
    desired_compaction_cronjob,
    desired_gate_job,
    desired_job,
    job_name,
)
from index_operator.resources.workloads import desired_objects

__all__ = [
    "Cluster",
    "desired_backfill_job",
    "desired_compaction_cronjob",
    "desired_gate_job",
    "desired_job",
    "desired_objects",
    "dns_name",
    "job_name",
    "service_name",
    "service_url",
]
