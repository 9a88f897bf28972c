"""genperc: diffusion models as perception models (ADDP, GenRep, DDAE++)."""

__version__ = "0.1.0"
