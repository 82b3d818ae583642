"""Pure functions of spectra and factors: effective-rank metrics, subspace alignment, weight concentration."""
