"""Tests of the HTTP server and the ONNX export."""
