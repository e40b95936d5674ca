"""Training engine: trainer core, hooks, distributed helpers, profiling."""
