"""Applications built on the tasks: the demo, the synthetic transfer benchmark, feature
visualisation and profiling helpers. Nothing in the library below imports from here."""
