from meshredirect.cli import entry

entry()
