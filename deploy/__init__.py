"""Deployable quantized models: ONNX QDQ export, packed integer weights, and their check in ONNX Runtime.

A layer above quantizers/ and lightning_modules/: it reads a trained fake-quant network and writes files
another runtime executes; nothing below imports it.
"""
