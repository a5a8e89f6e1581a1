"""MRML-side logic of the SPACRegistration module (nodes in, nodes out; no Qt, no torch).

Under construction. Every Python file added to this folder must also be listed in
``MODULE_PYTHON_SCRIPTS`` of ``SPACRegistration/CMakeLists.txt``.
"""
