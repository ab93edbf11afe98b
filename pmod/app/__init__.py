"""The applications, written once against :class:`pmod.engine.Engine`: the engine registry,
session and generation, chat, the OpenAI server, the benchmark, ``pmod info`` and the CLI.

They reach a runtime only through :mod:`pmod.app.registry`.
"""
