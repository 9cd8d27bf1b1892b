"""The parity gate's use: run_parity (run.py) puts one artefact beside the eager model and asks the gate
(verify.py, which moves here later) for the verdict."""
