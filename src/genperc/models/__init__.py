"""genperc.models."""
