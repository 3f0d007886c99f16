"""cwm_operator."""
