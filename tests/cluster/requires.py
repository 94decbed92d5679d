"""What a test on the local cluster needs from the machine (root for network namespaces, and
the tools the cluster runs), as skip marks shared by its test modules."""

from __future__ import annotations

import os
import shutil

import pytest

MISSING = [t for t in ("ip", "kubectl", "prometheus", "unshare") if shutil.which(t) is None]
NEEDS_CLUSTER = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(bool(MISSING), reason=f"missing tools: {MISSING} (`make tools`)"),
]
