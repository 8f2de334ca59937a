"""One module per backend, each declaring ``BACKEND``; the registry finds them all here."""
