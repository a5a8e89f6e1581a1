"""SPAC: Stochastic Planner-Actor-Critic deformable registration (Luo et al., AAAI 2022).

Modules (torch is imported by them, not by this package):

- ``config``: the settings, torch-free (:class:`~steprl.registration.config.SPACConfig` for the
  network, :class:`~steprl.registration.config.SPACTrainConfig` for the learner).
- ``networks``: planner, actor, critic.
- ``environment`` / ``replay`` / ``learner`` / ``data`` / ``training``: learning (SAC on the plan
  plus the unsupervised registration loss), ``steprl train registration``.
- ``model`` / ``inference`` / ``prealign``: model files, the ``register()`` generator, affine
  pre-alignment.
- ``outputs`` / ``evaluation`` / ``cli_args`` / ``commands``: the command-line side.
"""
