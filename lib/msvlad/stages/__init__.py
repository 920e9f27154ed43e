"""One module per pipeline stage (and CLI command), each with a `run(params, ...)` function.

`prepare` -> `train` -> `evaluate` -> `report` are the DVC stages of dvc.yaml, in that order; a
row's `train` stage runs `cluster` (k-means init), training and `whiten` in one process
(`train.run_stage`), and each of the three is also a command of its own. `info` prints the
network's dimensions; `ablate` queues and collects the ablation grid. `msvlad.cli` only parses
the arguments and calls the stage's `run`.
"""

STAGES: tuple[str, ...] = ("prepare", "train", "evaluate", "report")
