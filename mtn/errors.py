class MTNError(ValueError):
    """A user mistake (bad input, config, path); the CLI prints it without a traceback."""
