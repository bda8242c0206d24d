"""Pipeline stages, in pipeline order. Each reads the previous stages' folders and writes its own."""

from kd3.stages import average, dedup, demo_data, download, evaluate, inspect, score, select, train

#: name → stage module, in the order `make demo` runs them
STAGES = {module.NAME: module
          for module in (demo_data, download, score, dedup, select, train, average, evaluate, inspect)}
