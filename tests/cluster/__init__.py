"""A local cluster of real processes: network namespaces, pods as processes, Services (issue 17)."""
