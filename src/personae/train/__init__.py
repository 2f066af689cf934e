"""personae.train."""

# The built-in scene world registers its data kind (personae.data.kinds) on import; this package
# reaches every data folder through open_data, so it must be registered before any is opened.
import personae.world  # noqa: F401
