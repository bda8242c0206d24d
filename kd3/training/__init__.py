"""The training engine: the loop (:mod:`.loop`), where rows come from (:mod:`.sources`), what
happens around steps (:mod:`.callbacks`), resumable state (:mod:`.state`) and the objective
registry (:mod:`.objectives`). Selectors are pure functions in :mod:`kd3.methods.selectors`.
"""
