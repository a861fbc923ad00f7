"""One module per CLI command: ``register(parser)`` adds its arguments, ``run(args)`` does
the work. ``autoplan.cli.COMMANDS`` is the table of commands."""
