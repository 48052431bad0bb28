"""The benchmark: the scheme × attack robustness matrix and the training-overhead measurement."""

from lightning_wm.benchmark.matrix import AttackFactory, Benchmark
from lightning_wm.benchmark.overhead import measure_overhead, overhead_table
from lightning_wm.benchmark.report import heatmap, markdown_table, write_csv

__all__ = ["AttackFactory", "Benchmark", "heatmap", "markdown_table", "measure_overhead", "overhead_table", "write_csv"]
