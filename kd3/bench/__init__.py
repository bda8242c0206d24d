"""The quality benchmark: methods × seeds × scenarios → BENCHMARKS.md (``kd3 bench``).

:mod:`.spec` is the benchmark's own config (benchmarks/quality.yaml), :mod:`.cells` runs and
measures one (scenario, method, seed) cell with the pipeline's own stages, :mod:`.report` turns
the cells' results into tables and plots.
"""
