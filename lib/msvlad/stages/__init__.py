"""One module per pipeline stage (and CLI command), each with a `run(params, ...)` function.

`prepare` -> `cluster` -> `train` -> `whiten` -> `evaluate` -> `report` are the DVC stages of
dvc.yaml, in that order; `info` prints the network's dimensions. `msvlad.cli` only parses the
arguments and calls the stage's `run`.
"""

STAGES: tuple[str, ...] = ("prepare", "cluster", "train", "whiten", "evaluate", "report")
