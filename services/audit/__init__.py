"""The audit service: the append-only record of who did what to which resource, PHI reads included."""
