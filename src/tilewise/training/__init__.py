"""The data side of training: sharded datasets, patch samplers, augmentation and the loader.

Plain Python (numpy, Zarr, torch), no Ray: the training loop runs one copy of this per Ray Train
worker. The pieces, in the order a worker uses them:

* :mod:`tilewise.training.shards`: :func:`~tilewise.training.shards.open_shards` opens and checks
  the dataset (Zarr groups with ``image``, ``label`` and an optional ``weight``; for Mask R-CNN
  ``image``, ``instances`` and an optional ``instance_classes``) before any training starts.
* :mod:`tilewise.training.sampling`: :func:`~tilewise.training.sampling.assign_shards` deals the
  shards to the workers each epoch; the patch samplers pick patches inside a worker's shards,
  seeded and resumable.
* :mod:`tilewise.training.augment`: flips, 90° rotations, U-Net's elastic deformation, intensity
  jitter.
* :mod:`tilewise.training.loader`: background threads that read, augment and batch patches into a
  bounded queue, from Zarr or from memory.
* :mod:`tilewise.training.instances`: for instance architectures (Mask R-CNN), each patch's
  target (boxes, labels, masks) and validation by mask and box AP at IoU 0.5.
"""
