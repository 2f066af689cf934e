"""personae.app: the command-line application (parse, then call the library); nothing imports it."""
