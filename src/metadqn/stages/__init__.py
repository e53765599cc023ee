"""Stage functions: each a pure-ish function of params and paths; the CLI and flows only call them."""
