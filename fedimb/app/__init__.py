"""The wiring above the library: the ServerApp, the simulation runner, the CLI and the sweep.

Only this package imports ``strategies/`` and ``clients/``; everything else under ``fedimb/``
is the library both sides share.
"""
