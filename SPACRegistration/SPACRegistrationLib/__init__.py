"""MRML-side logic of the SPACRegistration module (nodes in, nodes out; no Qt, no torch).

- ``logic``: start / poll / cancel a registration on a scene (:class:`logic.RegistrationLogic`).
- ``process``: the worker process runner (reader threads, queue, whole-tree kill) and its Protocol.
- ``protocol``: the worker's JSON-line events as typed values.
- ``mrmlio``: Slicer's readers, writers and resampling for volumes and grid transforms.
- ``results``: the result nodes (step sequence, browser, metrics table and plot).
- ``models``: bundled and user models with their cards; ``parameters``: the parameter node;
  ``install``: the worker's Python dependencies, installed on the user's request.

Every Python file added to this folder must also be listed in ``MODULE_PYTHON_SCRIPTS`` of
``SPACRegistration/CMakeLists.txt``.
"""
