"""Quantization methods: pure functions from a weight tensor to a QuantizedTensor."""
