"""The inference core: the loaded model on its device, batching, warm-up, thread pools, CUDA streams and pinned
buffers. Tensors in, tensors out (core.py); the batcher (batcher.py) forms the batches."""
