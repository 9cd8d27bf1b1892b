"""The parity gate: gate.py holds the rules (data in, verdict out), run_parity (run.py) puts one
artefact beside the eager model and asks the gate for the verdict, realimages.py finds the real
images reduced precision is judged on."""
