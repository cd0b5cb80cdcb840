"""Command-line code: the only place with argparse and printing.

One module per group of commands, each with `register(sub)` that adds its subcommands to the parser
`cli.py` builds: model (generate, chat, info), serve, convert (convert, diff, delta), templates (templates,
prompt), quantize, train (train, lora merge), data, eval, bench. `options.py` holds the option vocabulary
they share and the one path from model options to a loaded model; `argtypes.py` the checked option types.
Registering imports no torch (`camelid --help` answers at once): heavy imports happen inside the commands.
Library modules never parse arguments; nothing imports this package but `cli.py`.
"""
