"""A slot's processes: the light supervisor (``python -m eep.rank``, under torchrun) and the
heavy worker it spawns (``python -m eep.rank.worker``)."""
