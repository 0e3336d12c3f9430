"""Training of the registered models on one process or many: ``python -m sknet_triton.train``.

Modules, one job each: ``options`` (the command line), ``presets`` (the published recipes as option
defaults), ``data`` (datasets, timm's augmentations, loaders), ``recipe`` (timm's loss, optimiser, schedule,
mixup and EMA), ``distributed`` (process group and collectives), ``loop`` (an epoch of training, an
evaluation), ``checkpoint`` (saving and resuming exactly), ``report`` (console and CSV), ``run`` (a whole
run, or an evaluation alone).
"""
