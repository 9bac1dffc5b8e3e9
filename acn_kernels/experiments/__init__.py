"""Experiments run from the command line: they use the library, the library never imports them."""
