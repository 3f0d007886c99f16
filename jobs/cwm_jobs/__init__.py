"""cwm_jobs."""
