"""Errors a training loop may see from the server's machinery (bad pushes raise `jaxps.PushError`)."""


class ShardDiedError(RuntimeError):
    """A shard's process or actor is gone; its state is lost."""


class ServerClosedError(RuntimeError):
    """The ParameterServer (and so every client taken from it) is closed."""
