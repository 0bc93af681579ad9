"""Runtimes the PyPI TVM wheel lacks (OpenCL) and their loaders."""
