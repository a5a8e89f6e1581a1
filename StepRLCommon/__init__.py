"""What the StepRL Slicer modules share (MRML and processes only; no Qt but in ``widgetbase``; no torch).

A plain Python package, not a Slicer module: CMake installs it beside the scripted modules, so
``import StepRLCommon`` works in Slicer, and the headless tests put the repository root on
``sys.path``.

- ``description``: what a module tells the shared code about itself (name, models, request,
  parameter node), one checked :class:`description.ModuleDescription` per module.
- ``workerlogic``: the run life cycle (start / poll / cancel / wait a ``steprl worker`` job);
  a module's logic subclasses :class:`workerlogic.WorkerLogic`, passing its description.
- ``process``: the worker process runner (reader threads, queue, whole-tree kill) and its Protocol.
- ``protocol``: the worker's JSON-line events as typed values.
- ``stepresults``: the step sequence, browser, metrics table and chart of one result.
- ``mrmlio``: volumes in and out of MRML with Slicer's readers and writers.
- ``hierarchy``: placing result nodes in the subject hierarchy, next to their input.
- ``models``: bundled and user models with their cards; ``parameters``: what the parameter
  nodes share; ``install``: the worker's Python dependencies, installed on the user's request.
- ``widgetbase``: the Qt side the module files share (panel, Slicer logic glue, self-test base).
  The only file here that imports Qt and Slicer's application modules: only the module files
  import it, inside Slicer (the headless tests check it statically).

Every Python file added to this folder must also be listed in ``StepRLCommon/CMakeLists.txt``.
"""
