"""The neuron target, split by concern (compile/neuron_target.py is the entry point export.py uses).

- toolchain.py  what is installed (versions, host family); no torch import, the server reads it too
- flags.py      supported TP degrees, LNC, compiler arguments per graph kind, HBM per core
- graphs.py     the bucket wrapper module: compile.model's functions plus the in-graph cache update
- trace.py      tp = 1: torch_neuronx.trace per bucket
- parallel.py   tp > 1: NxD Core ModelBuilder, one tag per bucket, checkpoint sharded per rank
- plan.py       --dry-run: the compile plan and the HBM estimate, without loading weights
"""
