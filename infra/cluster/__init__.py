"""suanli.infra.cluster: the Ray supervisor (gang launch, failure classification, restart)."""
