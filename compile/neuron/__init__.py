"""The neuron target, split by concern (compile/neuron_target.py is the entry point export.py uses).

- toolchain.py  what is installed (versions, supported SDK, host family); no torch import, the server reads it too
- flags.py      supported TP degrees, LNC, compiler arguments per graph kind, HBM per core
- graphs.py     the one module every tag is traced from: compile.model's functions plus the in-graph cache update
- builder.py    NxD Core ModelBuilder at every tp degree: one NxDModel, a tag per bucket, weights and state shared
- workers.py    how many neuronx-cc run at once (host memory)
- plan.py       --dry-run: the compile plan and the HBM estimate, without loading weights
"""
