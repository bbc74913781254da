"""The Transformer Engine path (``model.attention_backend=te``): TE's THD packing and context-parallel
rules with the TE version checks (:mod:`.thd`, pure Python, no TE needed), and the TE <-> local
checkpoint name table (:mod:`.checkpoint`)."""
