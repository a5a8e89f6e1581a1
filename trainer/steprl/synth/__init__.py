"""Synthetic data: every image steprl makes instead of reading it (torch is imported by the modules).

- ``toy``: small synthetic shapes, label maps, smooth random fields and registration or
  segmentation datasets with known answers, for the tests, smoke training and demos.
- ``from_labels``: images synthesised from label maps (random contrast, bias field, blur, noise)
  and the random affine + elastic augmentation that samples them (SynthSeg / SynthMorph style).
- ``synthseg``: the SynthSeg whole-head label maps: label tables, subject split, canonical grid.
- ``registration_pairs``: endless inter-subject training pairs from them (``steprl train
  registration --synthseg``).
- ``segmentation_slices``: training slices from them (``steprl train segmentation --synthseg``).
"""
