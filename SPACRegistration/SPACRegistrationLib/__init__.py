"""MRML-side logic of the SPACRegistration module (nodes in, nodes out; no Qt, no torch).

Built on the shared ``StepRLCommon`` package (run life cycle, worker protocol, process runner,
result nodes, model cards); what is here is SPAC's own:

- ``logic``: the registration checks, job and steps (:class:`logic.RegistrationLogic`).
- ``steps``: the step nodes of a registration result and "Keep this step".
- ``transforms``: grid transforms read from the worker's fields, copied and resampled through.
- ``models``: the SPAC models; ``parameters``: the parameter node.

Every Python file added to this folder must also be listed in ``MODULE_PYTHON_SCRIPTS`` of
``SPACRegistration/CMakeLists.txt``.
"""
