"""Datasets: synthetic data, labelme conversion, and the milesial and VOC layouts."""
