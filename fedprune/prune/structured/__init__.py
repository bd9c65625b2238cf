"""Structured and depth pruning: remove whole heads, channels and blocks, physically.

``groups`` (coupled structures, built by each family's adapter), ``importance`` (registered
criteria that score units), ``select`` (which units stay: uniform or adaptive allocation),
``surgery`` (slicing), ``depth`` (block importance and removal), ``io`` (save/load).
"""
