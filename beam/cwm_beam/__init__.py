"""cwm_beam."""
