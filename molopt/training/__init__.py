"""Training and evaluating neural potentials on labelled configurations."""
