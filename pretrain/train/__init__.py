"""Training: the loop (``loop``), the objectives it trains (``objectives``), checkpoints and
resume (``checkpoint``), the LR schedule, metrics sinks, probes of checkpoints while training,
and the fault hooks tests use (``faults``). Imports nothing: ``pretrain.train.loop`` is what
``pretrain train`` runs."""
