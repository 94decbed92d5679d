"""Driftless control plane (kopf operator). Built in the operator issue; empty until then."""
