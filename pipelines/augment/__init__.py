"""The batched multi-crop augmentation engine (crop from uint8 images, photometric chain; Triton kernels on CUDA)."""
