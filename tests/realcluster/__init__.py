"""A real single-node Kubernetes for the test tiers that need one (see scripts/realcluster)."""
