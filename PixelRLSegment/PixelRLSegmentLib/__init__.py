"""MRML-side logic of the PixelRLSegment module (nodes in, nodes out; no Qt, no torch).

Built on the shared ``StepRLCommon`` package (run life cycle, worker protocol, process runner,
result nodes, model cards); what is here is segmentation's own:

- ``logic``: the checks, the ``segment`` job and its steps (:class:`logic.SegmentationLogic`).
- ``steps``: the step labelmaps (mask + action change in one value), their colour tables and the
  action-change overlay, the result folder.
- ``segmentation``: the output segmentation node (and labelmap), the reference export for Dice.
- ``parameters``: the parameter node.

Every Python file added to this folder must also be listed in ``MODULE_PYTHON_SCRIPTS`` of
``PixelRLSegment/CMakeLists.txt``.
"""
