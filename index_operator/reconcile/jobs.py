"""What a Job's status says, and the bookkeeping of the Jobs an owner started (PURE)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    MISSING = "Missing"  # not created yet, or deleted (TTL)
    ACTIVE = "Active"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


def job_state(job: Mapping[str, Any] | None) -> JobState:
    """From a Job object (None = not found): its terminal condition, else active."""
    if job is None:
        return JobState.MISSING
    st = job.get("status") or {}
    for c in st.get("conditions") or ():
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return JobState.SUCCEEDED
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return JobState.FAILED
    completions = int((job.get("spec") or {}).get("completions") or 1)
    if int(st.get("succeeded") or 0) >= completions:
        return JobState.SUCCEEDED
    return JobState.ACTIVE
