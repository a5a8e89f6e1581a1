"""SPAC: Stochastic Planner-Actor-Critic deformable registration (Luo et al., AAAI 2022).

Modules (torch is imported by them, not by this package):

- ``networks``: planner, actor, critic (:class:`~steprl.registration.networks.SPACConfig`).
- ``environment`` / ``replay`` / ``learner`` / ``data`` / ``training``: learning (SAC on the plan
  plus the unsupervised registration loss), ``steprl train registration``.
- ``model`` / ``inference`` / ``prealign``: model files, the ``register()`` generator, affine
  pre-alignment.
- ``outputs`` / ``evaluation`` / ``cli_args`` / ``commands``: the command-line side.
"""
