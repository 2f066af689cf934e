"""personae.train."""
