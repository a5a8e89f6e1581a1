"""Placing result nodes in Slicer's subject hierarchy (the Data module's tree), next to their input.

In Slicer every node added to the scene gets a subject-hierarchy item at once (under the
scene); on slicer-core nothing does, so :func:`item_of` creates the item when it is missing.
Either way the results end up where the user looks for them: beside the input volume (same
parent: patient, study or folder), or in a folder there.

Example::

    folder = folder_next_to(volume, "CT PixelRL")      # a folder item beside the input
    place(sequence_node, folder)                        # the step nodes go into the folder
    place(segmentation_node, parent_of(volume))         # the kept output sits beside the input
"""

from __future__ import annotations

from slicer import vtkMRMLSubjectHierarchyNode


def hierarchy(scene) -> vtkMRMLSubjectHierarchyNode:
    """The scene's subject hierarchy node (created if the scene has none yet)."""
    return vtkMRMLSubjectHierarchyNode.ResolveSubjectHierarchy(scene)


def item_of(node) -> int:
    """The subject-hierarchy item of a node in a scene (created under the scene item when missing)."""
    sh = hierarchy(node.GetScene())
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def parent_of(node) -> int:
    """The item a node's subject-hierarchy item sits under (the scene item for a top-level node)."""
    sh = hierarchy(node.GetScene())
    return sh.GetItemParent(item_of(node))


def folder_next_to(node, name: str) -> int:
    """A new folder item ``name`` beside ``node`` (under the same parent)."""
    sh = hierarchy(node.GetScene())
    return sh.CreateFolderItem(parent_of(node), sh.GenerateUniqueItemName(name))


def place(node, parent: int) -> None:
    """Put ``node``'s item under ``parent``."""
    hierarchy(node.GetScene()).SetItemParent(item_of(node), parent)
