"""Benchmarks of extracted features (HPatches-sequences MMA in `evaluation.hpatches`)."""
