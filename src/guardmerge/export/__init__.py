"""Exports of a merged model to other runtimes: :mod:`guardmerge.export.onnx` (ONNX fp32 / int8)."""
