"""genperc.evaluation."""
