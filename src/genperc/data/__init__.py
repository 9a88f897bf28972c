"""genperc.data."""
