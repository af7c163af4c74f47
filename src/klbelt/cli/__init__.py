"""Layer 7: the command line. Each subcommand lives in its own module."""
