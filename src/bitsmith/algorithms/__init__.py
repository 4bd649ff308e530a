"""Weight solvers and quantizer steps; one method per file, each registered as a recipe step."""
