"""The measuring tools behind the command line: the library never imports them."""
