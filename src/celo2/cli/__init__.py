"""The ``celo2`` command line: one module per subcommand, each with ``register``."""
