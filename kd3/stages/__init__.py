"""Pipeline stages, in pipeline order. Each reads the previous stages' folders and writes its own."""

from kd3.stages import average, dedup, demo_data, download, evaluate, inspect, prepare_teacher, score, select, train

#: name → stage module, in the order `make demo` runs them; then the optional ones (prepare-teacher:
#: a generic teacher for a pool of students, run at the teacher owner's side before score)
STAGES = {module.NAME: module
          for module in (demo_data, download, score, dedup, select, train, average, evaluate, inspect, prepare_teacher)}
