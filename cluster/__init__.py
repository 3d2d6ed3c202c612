"""Ray: GPU-pinned replicas and the streaming job runner (see the distributed-generation issue)."""
