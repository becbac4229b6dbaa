"""jaxps's built-in transports, imported lazily by name (see `jaxps.transport`)."""
