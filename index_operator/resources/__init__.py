"""PURE builders: custom resources (+ observed state) in, Kubernetes manifests out."""

from index_operator.resources.access import (
    Tokens,
    desired_network_policy,
    hashes_secret_name,
    legacy_admin_secret_name,
    network_policy_name,
    plan_tokens,
    tokens_secret_name,
)
from index_operator.resources.common import (
    Cluster,
    NetworkPolicyConfig,
    dns_name,
    service_name,
    service_url,
)
from index_operator.resources.jobs import (
    backfill_job_name,
    desired_backfill_job,
    desired_compaction_cronjob,
    desired_gate_job,
    desired_job,
    job_name,
)
from index_operator.resources.prune import PRUNABLE, stale_children
from index_operator.resources.workloads import (
    awaits_encoder,
    desired_objects,
    index_encoders,
    serving_models,
)

__all__ = [
    "PRUNABLE",
    "Cluster",
    "NetworkPolicyConfig",
    "Tokens",
    "awaits_encoder",
    "backfill_job_name",
    "desired_backfill_job",
    "desired_compaction_cronjob",
    "desired_gate_job",
    "desired_job",
    "desired_network_policy",
    "desired_objects",
    "dns_name",
    "hashes_secret_name",
    "index_encoders",
    "job_name",
    "legacy_admin_secret_name",
    "network_policy_name",
    "plan_tokens",
    "service_name",
    "service_url",
    "serving_models",
    "stale_children",
    "tokens_secret_name",
]
