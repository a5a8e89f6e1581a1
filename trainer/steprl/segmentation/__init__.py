"""PixelDRL-MG: pixel-level deep reinforcement learning for segmentation (2D, slice by slice).

Liu et al., "Pixel level deep reinforcement learning for accurate and robust medical image
segmentation", Scientific Reports 15, 8213 (2025), built on PixelRL (Furuta et al.). Every
pixel is an agent; at each of ``t_max`` steps it either sets itself to zero (background) or
keeps its value (object), so the mask is refined step by step, with no threshold and no coarse
mask as input.

Modules (torch is imported by them, not by this package, so importing
``steprl.segmentation`` stays cheap):

- ``config``: every setting of network, learner and training, with its one default (no torch:
  the command line's options are made from it).
- ``networks``: half-width dilated VGG16 features, self-attention, policy and value heads
  (:class:`~steprl.segmentation.networks.PixelDRLNet`).
- ``environment``: the batched pixel environment (state, actions, per-pixel reward).
- ``pa3c``: the learner's maths (reward-map convolution, n-step returns, PA3C loss, episodes).
- ``data``: 2D slices (with labels brought onto the image grid physically) and a synthetic source
  (slices synthesised from SynthSeg label maps: :mod:`steprl.synth.segmentation_slices`).
- ``learner`` / ``unet`` / ``training``: the PA3C learner, the MONAI U-Net baseline, ``steprl train segmentation``.
- ``model`` / ``inference`` / ``outputs`` / ``evaluation``: model files, the ``segment()`` generator,
  ``steprl segment`` outputs, ``steprl evaluate segmentation``.
- ``cli_args`` / ``commands``: the command-line side.
"""
