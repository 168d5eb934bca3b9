"""The bottom layer: errors, flat config keys, the override parser, typed settings, atomic writes.

Nothing here knows about models, data or Ray; every other sub-package may import it.
"""
