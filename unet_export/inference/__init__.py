"""One image through any artefact: the predictor, its tiling and its masks (predictor.py)."""
