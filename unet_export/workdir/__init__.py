"""Everything that knows a workdir's manifest.json: publishing a verified artefact (publish.py),
finding the workdir's model and entries (lookup.py), and an IR's .bin beside its .xml (ir.py).
manifest.py (the transactions) moves here in a later step."""
