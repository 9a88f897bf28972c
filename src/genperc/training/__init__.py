"""genperc.training."""
