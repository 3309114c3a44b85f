"""Interatomic potentials (code). Parameter and weight files live in the top-level
``potentials/`` directory and are loaded by :mod:`molopt.potentials.registry`."""
