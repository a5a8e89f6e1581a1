"""MRML-side logic of the PixelRLSegment module (nodes in, nodes out; no Qt, no torch).

Under construction. Every Python file added to this folder must also be listed in
``MODULE_PYTHON_SCRIPTS`` of ``PixelRLSegment/CMakeLists.txt``.
"""
