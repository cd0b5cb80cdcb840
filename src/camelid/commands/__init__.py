"""Command-line code: the only place with argparse and printing.

One module per group of commands, each with `register(sub)` that adds its subcommands to the parser
`cli.py` builds. Library modules never parse arguments; nothing imports this package but `cli.py`.
Commands older than this package still live beside their library code and move here over time.
"""
