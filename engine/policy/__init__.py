"""FPL: grammar, loaders, compiler and the pure evaluator."""
