"""genperc.diffusion."""
