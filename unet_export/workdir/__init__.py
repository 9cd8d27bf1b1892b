"""Everything that knows a workdir's manifest.json: the store and its transactions (manifest.py),
publishing a verified artefact (publish.py), finding the workdir's model and entries (lookup.py),
and an IR's .bin beside its .xml (ir.py)."""
