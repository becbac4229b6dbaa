"""jaxps's built-in transports, chosen by name at run time (`jaxps.registry`); writing one: `jaxps.transport`."""
