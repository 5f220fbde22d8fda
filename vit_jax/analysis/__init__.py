"""Representation analyses: functions of (model, data) -> arrays.

Modules (import the one you need; each works on arrays and on any registry model):
  cka         -- CKA (linear / RBF, biased / debiased) and minibatch CKA heatmaps
  attention   -- mean attention distance, attention rollout
  embeddings  -- position-embedding similarity, patch-embedding principal components
  fourier     -- relative log amplitude of feature maps, variance, frequency-band noise
  hessian     -- top Hessian eigenvalues (power iteration / deflation), spectra density
  generation  -- input generation by gradient ascent (octaves, blur, jitter, Fourier)
  image_ops   -- image-space steps of optimised inputs: blur, crops, affine jitter, TV, start noise
  inversion   -- layer representation inversion and its judges (rep. distance, PSNR, SSIM)
  layers      -- shared plumbing: intermediates, named layers, batching, 'data' mesh sharding
"""
