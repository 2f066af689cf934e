"""personae.eval."""
