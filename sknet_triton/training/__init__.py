"""Training of the registered models on one process or many: ``python -m sknet_triton.train``.

Modules, one job each: ``options`` (the command line), ``data`` (datasets and loaders), ``distributed``
(process group and collectives), ``loop`` (an epoch of training, an evaluation, the schedule),
``checkpoint`` (saving and resuming exactly), ``report`` (console and CSV), ``run`` (a whole run).
"""
