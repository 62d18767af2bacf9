"""The subcommands of flexvlm-ray, one module each; cli.py holds the table that lists them."""
