"""personae.data."""
