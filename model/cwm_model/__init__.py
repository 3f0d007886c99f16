"""cwm_model."""
