"""genperc.interactive."""
