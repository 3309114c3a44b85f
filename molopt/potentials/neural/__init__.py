"""Learned interatomic potentials (PaiNN) and their weight files."""
