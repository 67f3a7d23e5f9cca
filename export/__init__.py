"""Artefact writers (installed as ``pfq_edge.export``): QONNX, FINN estimate build, deployment package."""
