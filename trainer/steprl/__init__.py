"""steprl: step-by-step reinforcement-learning registration (SPAC) and segmentation (PixelDRL-MG).

Importing the package is cheap: torch and SimpleITK load only when a submodule that needs
them is imported, so the Slicer modules can import ``steprl.geometry`` without torch.
"""

__version__ = "0.1.0"
